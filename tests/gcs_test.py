"""A pod run from a bucket, against a real GCS API server on 127.0.0.1 (fake-gcs-server, `ipadapter_jax.testing.gcs`).

One server, one bucket and one dataset for the module: captions and images uploaded -> `data build` (bucket in,
bucket out) -> `cache` -> an uninterrupted reference run (TensorBoard with a sample grid) -> a run SIGTERMed and
resumed by the same command, equal bit for bit -> its export inspected and loaded by `generate` from the bucket ->
2 processes sharing one gs:// workdir. And the one-line errors for a bad bucket name, a missing bucket and missing
credentials. Nothing reaches an address other than 127.0.0.1 (the environment points every client there).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ipadapter_jax import locks, paths, staging
from ipadapter_jax.cli import cache as cache_cli
from ipadapter_jax.cli import convert as convert_cli
from ipadapter_jax.cli import data as data_cli
from ipadapter_jax.cli import generate as generate_cli
from ipadapter_jax.cli.main import EXIT_PREEMPTED
from ipadapter_jax.data import synthetic
from ipadapter_jax.testing import gcs, pipeline_fixtures
from ipadapter_jax.testing import training_runs as runs
from ipadapter_jax.training import hooks, tensorboard
from ipadapter_jax.training.loop import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiprocess,
    pytest.mark.skipif(not gcs.available(), reason="the `test` extra (fake-gcs-server) is not installed"),
]

STEPS = 4
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with gcs.emulator(str(tmp_path_factory.mktemp("gcs_log"))) as server, server.environment():
        yield server


@pytest.fixture(scope="module")
def bucket(server) -> str:
    return server.create_bucket()


@pytest.fixture(scope="module")
def cache(bucket, tmp_path_factory) -> str:
    """`data build` from bucket captions and images into the bucket, then `cache` into the bucket."""
    local = tmp_path_factory.mktemp("src")
    synthetic.write_dataset(str(local), num_images=24, size=64, seed=0)
    staging.upload(str(local), f"{bucket}/src", what="sources", progress=False)
    argv = ["build", f"--json={bucket}/src/captions.json", f"--root={bucket}/src/images", f"--out={bucket}/data"]
    assert data_cli.main([*argv, "--no-progress"]) == 0
    raw = f"{bucket}/data/ip_adapter_captions/1.0.0"
    assert paths.exists(f"{raw}/dataset_info.json")
    assert cache_cli.main([f"--raw={raw}", f"--out={bucket}/cache", "--batch_size=8"]) == 0
    return f"{bucket}/cache"


@pytest.fixture(scope="module")
def reference(cache, bucket) -> str:
    """An uninterrupted run in the bucket, with held-out losses and a sample grid at its last step."""
    workdir = f"{bucket}/reference"
    extra = {"data.eval_path": cache, "eval_every": 2, "samples.every": STEPS, "samples.count": 1,
             "samples.per_prompt": 1, "samples.steps": 2}  # fmt: skip
    train(runs.config(cache, STEPS, GLOBAL_BATCH, **extra), workdir)
    return workdir


def _events(workdir: str) -> tuple[dict, dict]:
    """({tag: {step: value}} of the scalars, {tag: [steps]} of the images) of a workdir's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(paths.join(workdir, tensorboard.EVENTS_DIR), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    images = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    return scalars, images


def _metrics(workdir: str) -> list[dict]:
    return [json.loads(line) for line in paths.read_text(paths.join(workdir, hooks.METRICS_FILE)).splitlines()]


def _assert_events_equal_metrics(workdir: str) -> dict:
    """Every number of metrics.jsonl is in the event files at its step, and nothing else is; returns the scalars."""
    scalars, images = _events(workdir)
    expected: dict[str, dict[int, float]] = {}
    for record in _metrics(workdir):
        for key, value in record.items():
            if key != "step":
                expected.setdefault(tensorboard.scalar_tag(key), {})[record["step"]] = float(value)
    assert scalars.keys() == expected.keys()
    for tag, points in expected.items():
        assert scalars[tag] == pytest.approx(points, rel=1e-6), tag
    return scalars, images


@pytest.mark.slow
def test_tensorboard_events_in_the_bucket_equal_metrics_jsonl(reference):
    scalars, images = _assert_events_equal_metrics(reference)
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/param_norm", "perf/images_per_s",
                "perf/tflops_per_s"):  # fmt: skip
        assert sorted(scalars[tag]) == [2, 4], tag
    assert sorted(scalars["eval/loss"]) == [0, 2, 4]
    assert images == {"samples/grid": [STEPS]}
    assert not paths.exists(paths.join(reference, ".train.lock"))  # released at the end


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_then_resume_from_the_bucket_equals_uninterrupted(cache, reference, bucket, capsys, tmp_path):
    workdir = f"{bucket}/preempted"
    proc = runs.train_subprocess(workdir, runs.overrides(cache, 1000, GLOBAL_BATCH), devices=1)
    metrics = paths.join(workdir, hooks.METRICS_FILE)
    deadline = time.time() + 300
    while not paths.exists(metrics) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out
    stopped_at = int(runs.final_state(workdir)["['step']"])
    assert 2 <= stopped_at < 1000
    if stopped_at < STEPS:
        train(runs.config(cache, STEPS, GLOBAL_BATCH), workdir)  # the same run, resumed from the bucket
        runs.assert_states_close(runs.final_state(workdir), runs.final_state(reference), rtol=0)
    else:  # preempted past STEPS: compare with an uninterrupted run to the same step
        train(runs.config(cache, stopped_at + 2, GLOBAL_BATCH), f"{bucket}/reference_{stopped_at}")
        train(runs.config(cache, stopped_at + 2, GLOBAL_BATCH), workdir)
        runs.assert_states_close(runs.final_state(workdir), runs.final_state(f"{bucket}/reference_{stopped_at}"), 0)
    _assert_events_equal_metrics(workdir)  # the resumed run's event file purged the first one's later points

    exported = paths.join(workdir, hooks.FINAL_EXPORT)
    capsys.readouterr()
    assert convert_cli.main(["inspect", exported]) == 0
    inspected = capsys.readouterr().out
    assert "file:" in inspected and exported in inspected and "adapter_kind:" in inspected, inspected

    image = f"{bucket}/src/images/00000.png"
    argv = ["--base", "tiny", "--image-encoder", "tiny", "--adapter", exported, "--image", image, "--steps", "2",
            "--out", f"{bucket}/generated", "--compile-cache", "none"]  # fmt: skip
    assert generate_cli.main(argv) == 0
    settings = paths.read_json(f"{bucket}/generated/settings.json")
    assert settings["adapter"] == exported
    assert all(paths.size(f"{bucket}/generated/{name}") > 0 for name in [*settings["outputs"], "grid.png"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_share_one_bucket_workdir(cache, reference, bucket):
    """2 processes x 4 devices (jax.distributed on localhost), one gs:// workdir == the 1-device run."""
    workdir = f"{bucket}/two_processes"
    runs.train_two_processes(workdir, runs.overrides(cache, STEPS, GLOBAL_BATCH // 8))
    runs.assert_states_close(runs.final_state(workdir), runs.final_state(reference))
    assert [r["step"] for r in _metrics(workdir)] == [2, 4]  # process 0 alone wrote it, whole each time
    (events,) = paths.listdir(paths.join(workdir, tensorboard.EVENTS_DIR))  # one event file: process 0's
    assert events.startswith("events.out.tfevents.")
    _assert_events_equal_metrics(workdir)


def test_a_bad_bucket_name_is_one_usage_error(server, capsys):
    assert data_cli.main(["build", "--json=a.json", "--root=images", "--out=gs://Not_A-Bucket!/data"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: gs://Not_A-Bucket!/data: invalid bucket name 'Not_A-Bucket!'"), err
    assert len(err.splitlines()) == 1


def test_a_missing_bucket_is_one_error_before_any_work(server, tmp_path, capsys):
    out = "gs://no-such-bucket-here/run"
    assert data_cli.main(["build", f"--json={tmp_path}/missing.json", f"--root={tmp_path}", f"--out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: gs://no-such-bucket-here/run: the bucket 'no-such-bucket-here' does not exist; create it "
        "(`gcloud storage buckets create gs://no-such-bucket-here`) or fix the name"
    )


@pytest.mark.multiprocess
def test_no_credentials_is_one_error_before_any_work(server, bucket, tmp_path):
    """Without a token, application default credentials or gcloud's (a fresh HOME), `train` stops at once."""
    unset = ("FSSPEC_GS_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG")
    env = {k: v for k, v in gcs.python_env(server, HOME=str(tmp_path)).items() if k not in unset}
    command = [sys.executable, "-m", "ipadapter_jax.cli.train", "--config=tiny", f"--workdir={bucket}/nocreds",
               f"--config.data.path={bucket}/cache"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=runs.REPO)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {bucket}/nocreds: no Google Cloud credentials found"), result.stderr
    assert not paths.exists(f"{bucket}/nocreds/.train.lock")
    assert os.environ["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")


def test_a_bucket_lock_is_exclusive_and_a_dead_holders_is_taken_over(bucket):
    folder = f"{bucket}/locked"
    path = locks.acquire(folder, ".lock", "test")
    with pytest.raises(locks.LockHeldError, match=rf"^{path}: the folder is locked by pid {os.getpid()}"):
        locks.acquire(folder, ".lock", "test")
    locks.release(path)
    assert not paths.exists(path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    paths.write_json(path, {"pid": int(dead.stdout), "host": socket.gethostname()})
    assert locks.acquire(folder, ".lock", "test") == path  # its pid no longer runs: taken over
    assert paths.read_json(path)["pid"] == os.getpid()
    locks.release(path)


def test_write_if_generation_is_compare_and_swap(bucket):
    path = f"{bucket}/cas/object"
    paths.write_if_generation(path, b"first", "0")
    with pytest.raises(FileExistsError):
        paths.write_if_generation(path, b"second", "0")  # exists already
    generation = paths.generation(path)
    paths.write_if_generation(path, b"third", generation)
    with pytest.raises(FileExistsError):
        paths.write_if_generation(path, b"fourth", generation)  # changed since
    assert paths.read_bytes(path) == b"third"


def test_staging_copies_once_checks_sizes_and_refuses_what_does_not_fit(bucket, tmp_path, monkeypatch):
    source = tmp_path / "folder"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"a" * 1000)
    (source / "sub" / "b.bin").write_bytes(b"b" * 10)
    url = f"{bucket}/staged"
    staging.upload(str(source), url, what="test", progress=False)
    local = staging.stage_down(url, what="test", progress=False)
    assert local == staging.mirror(url) and local.startswith(os.environ[staging.CACHE_ENV])
    assert open(os.path.join(local, "sub", "b.bin"), "rb").read() == b"b" * 10
    mtime = os.stat(os.path.join(local, "a.bin")).st_mtime_ns
    os.utime(os.path.join(local, "a.bin"), ns=(0, 0))
    paths.write_bytes(f"{url}/sub/b.bin", b"c" * 20)  # changed in the bucket: copied again; a.bin is not
    assert staging.stage_down(url, what="test", progress=False) == local
    assert open(os.path.join(local, "sub", "b.bin"), "rb").read() == b"c" * 20
    assert os.stat(os.path.join(local, "a.bin")).st_mtime_ns == 0 != mtime
    paths.write_bytes(f"{url}/sub/b.bin", b"d" * 30)
    monkeypatch.setattr(staging, "FREE_SPACE_MARGIN", 1 << 60)  # a local disk too small for the copy
    with pytest.raises(staging.DoesNotFit, match=rf"^{url}: staging the test needs 0.0 GiB but .* free; set "
                       rf"{staging.CACHE_ENV} to a larger disk, or mount the bucket with gcsfuse"):  # fmt: skip
        staging.stage_down(url, what="test", progress=False)


def test_metrics_in_a_bucket_are_rewritten_whole_and_cut_on_resume(bucket):
    path = f"{bucket}/metrics/{hooks.METRICS_FILE}"
    paths.write_text(path, "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (2, 4, 6)))
    assert hooks.drop_records_after(path, 4) == [json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (2, 4)]
    assert [json.loads(line)["step"] for line in paths.read_text(path).splitlines()] == [2, 4]


@pytest.mark.slow
def test_a_pipeline_in_the_bucket_loads_like_the_local_one_and_caches_its_flax_params_there(
    sd15, bucket, tmp_path, monkeypatch
):
    import jax
    import numpy as np

    from ipadapter_jax.pipelines import IPAdapterPipeline

    def load(folder: str, cache_dir: str | None = None) -> dict:
        adapter = paths.join(folder, "ip-adapter-base.safetensors")
        pipe = IPAdapterPipeline.from_pretrained(folder, adapter, paths.join(folder, "image_encoder"),
                                                 cache_dir=cache_dir, progress=False)  # fmt: skip
        leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(pipe.params))[0]
        return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}

    staging.upload(str(sd15.folder), f"{bucket}/sd15", what="pipeline", progress=False)
    expected = load(str(sd15.folder))
    uploaded = None
    for attempt in range(2):  # converted and uploaded to flax_cache; then, from a fresh local cache, read from it
        monkeypatch.setenv(staging.CACHE_ENV, str(tmp_path / f"cache_{attempt}"))
        actual = load(f"{bucket}/sd15", cache_dir=f"{bucket}/flax_cache")
        assert actual.keys() == expected.keys()
        assert all(np.array_equal(actual[key], expected[key]) for key in expected)
        components = paths.listdir(f"{bucket}/flax_cache")
        markers = {c: paths.generation(f"{bucket}/flax_cache/{c}/cache.json") for c in components}
        assert "unet" in components and None not in markers.values()
        assert uploaded in (None, markers)  # the second load used the bucket's cache: nothing uploaded again
        uploaded = markers


def test_convert_reads_and_writes_bucket_objects(sd15, bucket, capsys):
    """official .safetensors -> Flax .msgpack -> official .bin with its metadata sidecar, all in the bucket."""
    import numpy as np

    from ipadapter_jax.weights import adapter_files

    source = pipeline_fixtures.adapter_file(sd15.folder, "base")
    paths.write_bytes(f"{bucket}/convert/in.safetensors", source.read_bytes())
    argv = ["to-flax", "--adapter", f"{bucket}/convert/in.safetensors", "--unet-config", str(sd15.folder / "unet"),
            "--out", f"{bucket}/convert/adapter.msgpack"]  # fmt: skip
    assert convert_cli.main(argv) == 0
    argv = ["to-torch", "--adapter", f"{bucket}/convert/adapter.msgpack", "--out", f"{bucket}/convert/out.bin"]
    assert convert_cli.main(argv) == 0
    assert paths.listdir(f"{bucket}/convert") == ["adapter.msgpack", "in.safetensors", "out.bin", "out.bin.json"]
    expected, actual = adapter_files.read_ip_adapter(source), adapter_files.read_ip_adapter(f"{bucket}/convert/out.bin")
    assert {k: v.keys() for k, v in actual.items()} == {k: v.keys() for k, v in expected.items()}
    assert all(np.array_equal(actual[s][k], expected[s][k]) for s in expected for k in expected[s])
    assert adapter_files.read_metadata(f"{bucket}/convert/out.bin")["adapter_kind"] == "base"
    assert f"wrote {bucket}/convert/out.bin: base, " in capsys.readouterr().out
