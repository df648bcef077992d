"""Data benchmarks, each a table and its section of bench/data_bench.json (the other section is kept).

build   `ipadapter-jax data build` at scale, in its own process: generates --images noise JPEGs of ~110 KB
        (they do not compress away; 50,000 = 5.5 GB) plus eight 8000x8000 PNGs (192 MB each decoded), then
        measures a full build (wall time, images/s, peak RSS = the process's ru_maxrss from wait4), a build
        killed with SIGKILL once half the entries are in complete shards, and the rerun that resumes it; the
        resumed dataset is compared with the full one (every shard's sha256, sampled records). Deletes the
        generated data afterwards (unless --keep).
loader  input-pipeline throughput: examples/s of the grain loader on raw and cached data, and what it costs a
        step. Generates COCO-like data (640x480 RGB JPEGs, quality 90, captions of ~10 words), builds the TFDS
        dataset and two embedding caches with record shapes of the tiny and SD1.5 configurations, then times
        `DataIterator` (steady state, after a warm-up) on this machine:
          raw     decode JPEG + target resize/crop + CLIP resize/crop + tokenise   (a step without cache)
          cached  read + msgpack-decode latents mean/std, image embedding, text states (a cached step)
        and relates it to a training step:
          tiny   the tiny UNet's frozen forward+backward on this 2-core CPU (REFERENCE.md s.5: 3.17 s per batch
                 of 4, 32x32 latents = 256 px images); share = loader time per step / step time, if run serially.
          SD1.5  1,666 GFLOP per example for forward+backward (REFERENCE.md s.4) at an assumed model-FLOP
                 utilisation of the accelerator's peak: examples/s one accelerator consumes, and how many host
                 cores of this machine's speed the loader needs to keep it fed.

Usage: python bench/data_bench.py build [--images 50000] [--dir /tmp] [--threads 8] [--keep]
       python bench/data_bench.py [loader] [--images 48] [--examples 256] [--threads 2] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ipadapter_jax  # noqa: E402,F401  (log filter first)

# isort: split
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ipadapter_jax.data import builder  # noqa: E402  (light: no jax, no transformers)
from ipadapter_jax.testing import data_files  # noqa: E402

TINY_STEP_S, TINY_STEP_BATCH = 3.17, 4  # REFERENCE.md s.5, measured on this kind of machine
SD15_GFLOP_PER_EXAMPLE = 1666  # REFERENCE.md s.4, frozen-UNet adapter training forward+backward
SD15_ENCODER_GFLOP = 1114 + 340  # REFERENCE.md s.4: VAE encoder at 512^2 + CLIP ViT-H/14, per raw example
ACCELERATORS = {"TPU v5e": 197, "TPU v4": 275, "TPU v5p": 459, "H100 (measured peak)": 800}  # TFLOP/s bf16
ASSUMED_MFU = 0.4

# Record shapes: latents of a 4-channel VAE at /8, one image embedding, text-encoder states of 77 tokens.
CONFIGS = {
    "tiny": dict(resolution=256, latent=32, embed=256, text_dim=256),
    "sd15": dict(resolution=512, latent=64, embed=1024, text_dim=768),
}
WORDS = "a the dog cat photo of on in with red small large street table man woman sitting standing near".split()


def sd15_examples_per_s(peak_tflops: float) -> float:
    """Examples/s one accelerator trains SD1.5 at `ASSUMED_MFU` of `peak_tflops`."""
    return peak_tflops * 1e12 * ASSUMED_MFU / (SD15_GFLOP_PER_EXAMPLE * 1e9)


def make_images(root: str, count: int) -> str:
    rng = np.random.default_rng(0)
    images = os.path.join(root, "images")
    os.makedirs(images)
    entries = []
    for i in range(count):
        pixels = data_files.smooth_rgb(rng, 480, 640)
        Image.fromarray(pixels).save(os.path.join(images, f"{i}.jpg"), quality=90)
        entries.append({"image_file": f"{i}.jpg", "text": " ".join(rng.choice(WORDS, 10))})
    path = os.path.join(root, "captions.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


def stand_in_encoders(config: dict) -> dict:
    """Encoders with the output shapes of the configuration. Their values are random normal: high-entropy
    floats like real latents and embeddings, so zstd compression does not flatter the read speed."""
    import jax
    import jax.numpy as jnp

    latent, embed, text_dim = config["latent"], config["embed"], config["text_dim"]

    def fn(_, batch):
        b = batch["pixel_values"].shape[0]
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        return {
            "latent_mean": jax.random.normal(keys[0], (b, latent, latent, 4)),
            "latent_std": jnp.exp(jax.random.normal(keys[1], (b, latent, latent, 4))),
            "image_embeds": jax.random.normal(keys[2], (b, embed)),
            "text_states": jax.random.normal(keys[3], (b, 77, text_dim)).astype(jnp.bfloat16),
        }

    return {"stand_in": (fn, {})}


def time_loader(data, examples: int, threads: int, workers: int, batch: int = 8) -> float:
    """Steady-state examples/s of DataIterator (first 2 batches are warm-up)."""
    from ipadapter_jax.data import loader

    it = loader.DataIterator(data, global_batch_size=batch, seed=0, num_threads=threads,
                             prefetch_buffer_size=2 * threads, worker_count=workers)  # fmt: skip
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    steps = max(1, examples // batch)
    for _ in range(steps):
        next(it)
    elapsed = time.perf_counter() - start
    it.close()
    return steps * batch / elapsed


def time_stages(data, pre, count: int = 16) -> dict:
    """Single-thread milliseconds per example of each raw preprocessing stage."""
    from ipadapter_jax.data import preprocess
    from ipadapter_jax.models.clip_preprocessing import preprocess as clip_preprocess

    records = [data.source[i] for i in range(count)]
    stages = {}
    start = time.perf_counter()
    images = [preprocess.decode_rgb(r["image"]) for r in records]
    stages["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    for image in images:
        preprocess.target_image(image, pre.resolution)
    stages["target resize+crop"] = time.perf_counter() - start
    start = time.perf_counter()
    for image in images:
        clip_preprocess(image, pre.clip)
    stages["clip resize+crop"] = time.perf_counter() - start
    start = time.perf_counter()
    for r in records:
        preprocess.tokenize(pre.tokenizers[0], r["text"].decode())
    stages["tokenize"] = time.perf_counter() - start
    return {k: 1000 * v / count for k, v in stages.items()}


def loader_main(args: argparse.Namespace) -> dict:
    """The `loader` benchmark; returns its JSON section."""
    import jax

    from ipadapter_jax.data import embedding_cache, loader, preprocess

    root = tempfile.mkdtemp(prefix="data_bench-")
    annotations = make_images(root, args.images)
    raw_dir, _ = builder.build_dataset(annotations, os.path.join(root, "images"), os.path.join(root, "out"),
                                       progress=False)  # fmt: skip
    tokenizer = data_files.tiny_clip_tokenizer(os.path.join(root, "tokenizer"))

    rows, stages = [], {}
    for name, config in CONFIGS.items():
        pre = preprocess.Preprocessor([tokenizer], resolution=config["resolution"])
        raw = loader.open_dataset(raw_dir, pre)
        stages[name] = time_stages(raw, pre)
        cache_dir = os.path.join(root, f"cache-{name}")
        embedding_cache.build_embedding_cache(
            raw_dir, cache_dir, pre, stand_in_encoders(config), batch_size=8, num_threads=args.threads, progress=False
        )
        cached = loader.open_dataset(cache_dir)
        for kind, data in (("raw", raw), ("cached", cached)):
            rate = time_loader(data, args.examples, args.threads, args.workers)
            row = {"config": name, "resolution": config["resolution"], "data": kind, "examples_per_s": rate}
            if name == "tiny":
                loader_s = TINY_STEP_BATCH / rate
                row["share_of_cpu_step"] = loader_s / TINY_STEP_S
            else:
                per_core = rate / min(os.cpu_count(), args.threads * max(1, args.workers))
                row["cores_per_accelerator"] = {
                    acc: sd15_examples_per_s(peak) / per_core for acc, peak in ACCELERATORS.items()
                }
            rows.append(row)

    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "threads": args.threads, "workers": args.workers, "jax_backend": jax.default_backend()},
        "images": "640x480 JPEG q90",
        "assumptions": {"tiny_step_s_batch4": TINY_STEP_S, "sd15_gflop_per_example": SD15_GFLOP_PER_EXAMPLE,
                        "mfu": ASSUMED_MFU, "peak_tflops": ACCELERATORS},
        "sd15_raw_extra_device_gflop_per_example": SD15_ENCODER_GFLOP,
        "sd15_examples_per_s_per_accelerator": {acc: sd15_examples_per_s(p) for acc, p in ACCELERATORS.items()},
        "stage_ms_per_example": stages,
        "results": rows,
    }  # fmt: skip
    shutil.rmtree(root)

    print(f"loader on {os.cpu_count()} CPUs, {args.threads} threads, {args.workers} workers; images 640x480 JPEG")
    print(f"{'config':6} {'data':7} {'ex/s':>8} {'ms/ex':>7}  cost of a training step")
    for row in rows:
        if "share_of_cpu_step" in row:
            share = 100 * row["share_of_cpu_step"]
            cost = f"{share:.1f}% of the tiny CPU step ({TINY_STEP_S} s / {TINY_STEP_BATCH} ex)"
        else:
            cost = "host cores per accelerator: " + ", ".join(
                f"{acc} {n:.2f}" for acc, n in row["cores_per_accelerator"].items()
            )
        rate = row["examples_per_s"]
        print(f"{row['config']:6} {row['data']:7} {rate:8.1f} {1000 / rate:7.2f}  {cost}")
    print(f"SD1.5 step consumes (ex/s per accelerator at {ASSUMED_MFU:.0%} MFU): "
          + ", ".join(f"{acc} {sd15_examples_per_s(p):.0f}" for acc, p in ACCELERATORS.items()))  # fmt: skip
    print(
        f"SD1.5 raw data also runs the VAE encoder and CLIP on the accelerator: {SD15_ENCODER_GFLOP:,} GFLOP "
        f"per example, +{SD15_ENCODER_GFLOP / SD15_GFLOP_PER_EXAMPLE:.0%} over the step; cached data does not"
    )
    for name, stage in stages.items():
        print(f"{name} raw stages, ms/example single-thread: " + ", ".join(f"{k} {v:.2f}" for k, v in stage.items()))
    return result


# --- build ---------------------------------------------------------------------------------------------------
JPEG_SHAPE, JPEG_QUALITY, HUGE_SIDE, HUGE_COUNT = (336, 432, 3), 85, 8000, 8


def _write_images(job: tuple) -> int:
    """Writes images `start..stop` (noise JPEGs; `huge` indices: 8000x8000 PNGs); returns their bytes."""
    images, start, stop, huge = job
    rng, total = np.random.default_rng(start), 0
    for i in range(start, stop):
        path = os.path.join(images, f"{i // 1000:03d}", f"{i:06d}.{'png' if i in huge else 'jpg'}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if i in huge:  # smooth: a small file that decodes to 192 MB
            ramp = np.arange(HUGE_SIDE, dtype=np.uint32) * 255 // HUGE_SIDE
            pixels = np.empty((HUGE_SIDE, HUGE_SIDE, 3), np.uint8)
            pixels[..., 0], pixels[..., 1] = ramp[None, :], ramp[:, None]
            pixels[..., 2] = (ramp[None, :] + ramp[:, None] + i) // 2
            Image.fromarray(pixels).save(path, compress_level=1)
        else:
            Image.fromarray(rng.integers(0, 256, JPEG_SHAPE, np.uint8)).save(path, quality=JPEG_QUALITY)
        total += os.path.getsize(path)
    return total


def generate(root: str, count: int) -> tuple[str, str, int]:
    """`count` images + HUGE_COUNT huge ones spread among them, and their captions; (json, image root, bytes)."""
    images = os.path.join(root, "images")
    huge = {count * (k + 1) // (HUGE_COUNT + 1) for k in range(HUGE_COUNT)}
    jobs = [(images, start, min(start + 500, count), huge) for start in range(0, count, 500)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        total = sum(pool.imap_unordered(_write_images, jobs))
    rng = np.random.default_rng(0)
    entries = [{"image_file": f"{i // 1000:03d}/{i:06d}.{'png' if i in huge else 'jpg'}",
                "text": " ".join(rng.choice(WORDS, 10))} for i in range(count)]  # fmt: skip
    path = os.path.join(root, "captions.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path, images, total


def _committed(out: str) -> int:
    """Entries covered by the complete shards of the build in progress in `out`."""
    try:
        with open(os.path.join(out, ".building-ip_adapter_captions", "progress.jsonl")) as f:
            lines = [line for line in f if line.endswith("\n")]
        return json.loads(lines[-1])["end"] if lines else 0
    except FileNotFoundError:
        return 0


def timed_build(argv: list[str], log: str, kill_at: int | None = None) -> dict:
    """Runs `ipadapter-jax data build` in its own process: wall time, peak RSS, exit status; with `kill_at`,
    SIGKILLs it once that many entries are in complete shards."""
    out = argv[argv.index("--out") + 1]
    start = time.perf_counter()
    with open(log, "w") as f:
        process = subprocess.Popen([sys.executable, "-m", "ipadapter_jax.cli.data", *argv], cwd=REPO, stdout=f,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        result, pid = {}, 0  # wait4, not poll(): poll would reap it without its rusage
        while kill_at is not None and not pid and "committed_at_kill" not in result:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if not pid and _committed(out) >= kill_at:
                os.kill(process.pid, signal.SIGKILL)
                result["committed_at_kill"] = _committed(out)
            time.sleep(0.2)
        if not pid:
            _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    with open(log) as f:
        text = f.read()
    if kill_at is None and process.returncode != 0:
        raise RuntimeError(f"data build failed ({process.returncode}):\n{text[-3000:]}")
    resumed = [int(line.split()[-1]) for line in text.splitlines() if line.startswith("resumed an interrupted")]
    return {**result, "wall_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
            "returncode": process.returncode, "resumed_from_entry": resumed[0] if resumed else 0}  # fmt: skip


def same_datasets(a_dir: str, b_dir: str) -> dict:
    """Compares two built datasets record by record (every field) and by their TFDS metadata. Not byte by byte:
    TFDS's record encoding is a protobuf map, whose byte order varies between processes."""
    a, b = builder.raw_source(a_dir), builder.raw_source(b_dir)
    differ = sum(any(not np.array_equal(x[k], y[k]) for k in x) or x.keys() != y.keys() for x, y in zip(a, b))
    info = [json.load(open(os.path.join(d, "dataset_info.json")))["splits"] for d in (a_dir, b_dir)]
    return {"records": len(a), "same_count": len(a) == len(b), "records_differing": differ,
            "same_shard_lengths": info[0] == info[1]}  # fmt: skip


def build_main(args: argparse.Namespace) -> dict:
    """The `build` benchmark; returns its JSON section."""
    root = tempfile.mkdtemp(prefix="data_bench_build-", dir=args.dir)
    try:
        start = time.perf_counter()
        annotations, images, image_bytes = generate(root, args.images)
        generate_s = time.perf_counter() - start
        argv = ["--json", annotations, "--root", images, "--threads", str(args.threads), "--no-progress"]
        argv += ["--shard-mib", str(args.shard_mib)] if args.shard_mib else []
        full_out, resumed_out = os.path.join(root, "full"), os.path.join(root, "resumed")
        full = timed_build(["build", *argv, "--out", full_out], os.path.join(root, "full.log"))
        killed = timed_build(["build", *argv, "--out", resumed_out], os.path.join(root, "killed.log"), args.images // 2)
        resumed = timed_build(["build", *argv, "--out", resumed_out], os.path.join(root, "resumed.log"))
        full_dir = builder.dataset_dir(full_out)
        same = same_datasets(full_dir, builder.dataset_dir(resumed_out))
        shards = [n for n in os.listdir(full_dir) if ".array_record-" in n]
        dataset_bytes = sum(os.path.getsize(os.path.join(full_dir, n)) for n in shards)
    finally:
        if not args.keep:
            shutil.rmtree(root)
    written = same["records"]
    return {
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "threads": args.threads},
        "images": {"count": args.images, "bytes": image_bytes, "generate_s": generate_s,
                   "kinds": f"{args.images - HUGE_COUNT} noise JPEG {JPEG_SHAPE[1]}x{JPEG_SHAPE[0]} q{JPEG_QUALITY} + "
                            f"{HUGE_COUNT} PNG {HUGE_SIDE}x{HUGE_SIDE}"},
        "full": {**full, "images_per_s": written / full["wall_s"], "mb_per_s": dataset_bytes / 1e6 / full["wall_s"],
                 "dataset_bytes": dataset_bytes, "shards": len(shards)},
        "killed": {"committed_at_kill": 0, **killed},
        "resumed": {**resumed, "images_this_run": written - resumed["resumed_from_entry"]},
        "resumed_equals_full": same,
    }  # fmt: skip


def print_build(result: dict) -> None:
    images, full, killed, resumed = result["images"], result["full"], result["killed"], result["resumed"]
    print(f"data build: {images['count']:,} images, {images['bytes'] / 1e9:.2f} GB ({images['kinds']}); "
          f"{result['machine']['cpus']} CPUs, --threads {result['machine']['threads']}")  # fmt: skip
    print(f"{'run':38} {'wall s':>8} {'images/s':>9} {'MB/s':>7} {'peak RSS MiB':>13}")
    rows = [("full build", full["wall_s"], result["images"]["count"], full["peak_rss_mib"]),
            (f"killed (SIGKILL) after {killed['committed_at_kill']:,} entries", killed["wall_s"],
             killed["committed_at_kill"], killed["peak_rss_mib"]),
            (f"rerun: resumed after entry {resumed['resumed_from_entry']:,}", resumed["wall_s"],
             resumed["images_this_run"], resumed["peak_rss_mib"])]  # fmt: skip
    for name, wall, count, rss in rows:
        mb = full["dataset_bytes"] * count / images["count"] / 1e6 / wall
        print(f"{name:38} {wall:8.1f} {count / wall:9.1f} {mb:7.1f} {rss:13.0f}")
    same = result["resumed_equals_full"]
    print(f"dataset: {full['dataset_bytes'] / 1e9:.2f} GB in {full['shards']} shards; resumed build vs full build: "
          f"{same['records']:,} records, {same['records_differing']} differing, same count {same['same_count']}, "
          f"same shard lengths {same['same_shard_lengths']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", nargs="?", choices=("build", "loader"), default="loader")
    parser.add_argument("--images", type=int, help="images generated (build: 50000, loader: 48)")
    parser.add_argument("--examples", type=int, default=256, help="loader: examples timed per measurement")
    parser.add_argument("--threads", type=int, help="build: 8 (the command's default); loader: the CPU count")
    parser.add_argument("--workers", type=int, default=0, help="loader: grain worker processes")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="build: where the data is generated")
    parser.add_argument("--keep", action="store_true", help="build: keep the generated data")
    parser.add_argument("--shard-mib", type=float, help="build: the command's --shard-mib (default: its own)")
    parser.add_argument("--json", default=os.path.join(REPO, "bench", "data_bench.json"))
    args = parser.parse_args()
    if args.bench == "build":
        args.images, args.threads = args.images or 50_000, args.threads or 8
        result = build_main(args)
        print_build(result)
    else:
        args.images, args.threads = args.images or 48, args.threads or os.cpu_count()
        result = loader_main(args)
    sections = json.load(open(args.json)) if os.path.exists(args.json) else {}
    if "loader" not in sections and "results" in sections:  # the earlier layout: the loader's section only
        sections = {"loader": sections}
    sections[args.bench] = result
    with open(args.json, "w") as f:
        json.dump(sections, f, indent=1)
    print(f"wrote {args.json} ({args.bench})")


if __name__ == "__main__":
    main()
