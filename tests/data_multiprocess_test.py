"""Two real JAX processes (jax.distributed on localhost, 2 CPU devices each) assemble global batches with
`make_array_from_process_local_data`; the gathered global batches equal a one-process run's. Both then run
the embedding-cache pass, each on its own devices and chunks, and process 0 alone finalises the cache.

Run by pytest; each process is this file run as a script: `python tests/data_multiprocess_test.py WORKER_ARGS`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from ipadapter_jax.testing import data_files

STEPS, GLOBAL_BATCH, SEED, RESOLUTION = 3, 8, 11, 16


def _mean_colour(params, batch):
    """A stand-in encoder: mean colour of the target image."""
    import jax.numpy as jnp

    return {"mean_colour": jnp.mean(batch["pixel_values"], axis=(1, 2))}


def _worker(process_id: int, port: int, dataset: str, out: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from jax.experimental import multihost_utils

    from ipadapter_jax.data import embedding_cache, loader, preprocess

    pre = preprocess.Preprocessor([], resolution=RESOLUTION, clip=preprocess.ClipPreprocessing.default(8))
    data = loader.open_dataset(dataset, pre)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))  # 4 devices, 2 per process
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    it = loader.DataIterator(data, global_batch_size=GLOBAL_BATCH, seed=SEED, sharding=sharding, num_threads=1)
    gathered = []
    for _ in range(STEPS):
        batch = next(it)
        assert batch["pixel_values"].shape == (GLOBAL_BATCH, RESOLUTION, RESOLUTION, 3)
        assert len(batch["pixel_values"].addressable_shards) == 2  # this process holds half the batch
        gathered.append(
            {k: multihost_utils.process_allgather(batch[k], tiled=True).tolist() for k in ("index", "pixel_values")}
        )
    assert it.get_state()["step"] == STEPS
    info = embedding_cache.build_embedding_cache(
        dataset, os.path.join(os.path.dirname(out), "cache"), pre, {"mean": (_mean_colour, {})},
        batch_size=2, chunk_size=4, num_threads=1, progress=False,
    )  # fmt: skip
    assert (info is None) == (process_id == 1), info
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    jax.distributed.shutdown()


def test_two_processes_assemble_global_batches_and_build_a_cache(tmp_path):
    from ipadapter_jax.data import builder, embedding_cache, loader, preprocess

    spec = data_files.make_dataset(str(tmp_path))
    dataset, _ = builder.build_dataset(spec["json"], spec["root"], tmp_path / "out", max_skip_fraction=0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "gathered.json")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(i), str(port), dataset, out],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)

    with open(out) as f:
        gathered = json.load(f)
    pre = preprocess.Preprocessor([], resolution=RESOLUTION, clip=preprocess.ClipPreprocessing.default(8))
    data = loader.open_dataset(dataset, pre)
    it = loader.DataIterator(data, global_batch_size=GLOBAL_BATCH, seed=SEED, process_count=1, process_index=0)
    for step in range(STEPS):
        expected = next(it)
        np.testing.assert_array_equal(gathered[step]["index"], expected["index"])
        np.testing.assert_array_equal(np.asarray(gathered[step]["pixel_values"], np.float32), expected["pixel_values"])

    cache = embedding_cache.CachedSource(tmp_path / "cache")
    assert len(cache) == len(data.source) == 18 and len(cache.info["files"]) == 5
    for i in range(len(cache)):
        expected = pre(data.source[i])["pixel_values"].mean(axis=(0, 1))
        np.testing.assert_allclose(cache[i]["mean_colour"], expected, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
