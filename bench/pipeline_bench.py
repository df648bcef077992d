"""Generation speed: our JAX `IPAdapterPipeline` vs diffusers' PyTorch `StableDiffusionPipeline` with the same
IP-Adapter, on this machine.

Both pipelines are built from one random PyTorch model saved to disk (the JAX one through the project's loaders)
and generate the same request: image prompt + text, DDIM, classifier-free guidance, `--steps` steps, 2 images
per prompt, the same initial latents. Reported per image, after warm-up, the fastest of `--repeats` runs that
alternate between the frameworks (on a shared machine the fastest run is the least disturbed one; PyTorch's
OpenMP threads slow down by up to 10x when other processes take the cores, XLA's much less; every run is in the
JSON): wall time of the whole call (text and image encoding, sampling, VAE decode) and, for JAX, of the compiled
sampling function alone; JAX's compile time separately (no persistent cache).
The model is "tiny but not trivial": an SD1.5-shaped UNet with channels (64, 128, 256, 256), 8 heads,
77 text tokens of width 256, a 4-block VAE, 256x256 images (32x32 latents), a small CLIP image encoder.

`--multi` adds rows for two adapters + regional masks vs one adapter, JAX and PyTorch side by side
(`bench/multi_adapter_rows.py`). Sections not rerun are kept from the existing JSON.

`--sd15-unet` also times one guided denoising step (UNet forward on batch 2) of an SD1.5-sized UNet (859.5M
params, random weights) at `--sd15-latent` (64 = 512x512 px) in both frameworks.

Usage: python bench/pipeline_bench.py [--steps 10] [--repeats 3] [--multi] [--sd15-unet] [--json FILE]
(shared machines: the runs alternate between frameworks, and the JSON records the load average)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ipadapter_jax  # noqa: E402,F401  (log filter first)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402

from bench.multi_adapter_rows import bench_two_adapters  # noqa: E402
from ipadapter_jax.testing import (
    pipeline_fixtures,  # noqa: E402
    tiny,  # noqa: E402
    tiny_folders,  # noqa: E402
)

SIZE = 256  # pixels; 32x32 latents
TEXT_TOKENS = 77
UNET = dict(
    sample_size=SIZE // 8,
    block_out_channels=(64, 128, 256, 256),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=256,
)
VAE = dict(
    block_out_channels=(64, 128, 128, 128),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=SIZE,
)
SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json (the fields that differ from the defaults)
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
)


def build_model(folder: Path) -> tuple[object, Path]:
    """Saves the bench's PyTorch pipeline (with image encoder) and a base IP-Adapter file into `folder`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(0)
    files = tiny_folders.tokenizer_files(folder / "vocab")
    tokenizer = CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=TEXT_TOKENS)
    vocab = len(tokenizer)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=UNET["cross_attention_dim"],
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=TEXT_TOKENS,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            patch_size=32,
            projection_dim=256,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=tiny.torch_unet(UNET),
        scheduler=DDIMScheduler(**pipeline_fixtures.DDIM),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(),
        image_encoder=image_encoder.eval(),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    official = tiny.random_official_adapter(pipe.unet, clip_dim=256, num_tokens=4)
    adapter = folder / "ip-adapter.safetensors"
    safetensors.numpy.save_file({f"{s}.{k}": v for s, part in official.items() for k, v in part.items()}, str(adapter))
    return pipe, adapter


def bench_pipelines(steps: int, repeats: int, multi: bool = False) -> dict:
    from ipadapter_jax.pipelines import IPAdapterPipeline
    from ipadapter_jax.weights import load_adapter, load_base, load_image_encoder

    batch = 2
    image = pipeline_fixtures.test_image(0, (320, 240))
    latents = np.random.default_rng(0).standard_normal((batch, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    request = dict(num_inference_steps=steps, guidance_scale=7.5, height=SIZE, width=SIZE)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch_pipe, adapter_path = build_model(folder)
        torch_base = copy.deepcopy(torch_pipe) if multi else None
        torch_pipe.load_ip_adapter(str(folder), subfolder="", weight_name=adapter_path.name, image_encoder_folder=None)
        torch_pipe.set_ip_adapter_scale(0.6)
        torch_pipe.set_progress_bar_config(disable=True)

        base = load_base(folder, progress=False)
        encoder = load_image_encoder(folder / "image_encoder")
        pipe = IPAdapterPipeline(base, encoder, load_adapter(adapter_path, base, image_encoder=encoder))

        def run_jax() -> tuple[float, dict, np.ndarray]:
            start = time.perf_counter()
            out = pipe(
                image, prompt="a photo of a cat", scale=0.6, num_images_per_prompt=batch, latents=latents, **request
            )
            return time.perf_counter() - start, out.timings, out.pixels

        def run_torch() -> tuple[float, np.ndarray]:
            start = time.perf_counter()
            with torch.no_grad():
                out = torch_pipe(
                    prompt="a photo of a cat",
                    ip_adapter_image=image,
                    num_images_per_prompt=batch,
                    latents=torch.from_numpy(latents),
                    output_type="np",
                    **request,
                ).images
            return time.perf_counter() - start, out

        first_s, first_timings, jax_pixels = run_jax()
        _, torch_pixels = run_torch()  # warm-up
        # Alternating, so that both see the same load from other processes on a shared machine.
        jax_runs, torch_runs = [], []
        for _ in range(repeats):
            jax_runs.append(run_jax())
            torch_runs.append(run_torch()[0])
        two_adapters = None
        if multi:
            common = dict(prompt="a photo of a cat", num_images_per_prompt=batch, latents=latents, **request)
            two_adapters = bench_two_adapters(folder, torch_base, adapter_path, pipe, common, repeats)

    jax_call = min(r[0] for r in jax_runs) / batch
    jax_sample = min(r[1]["sample_s"] for r in jax_runs) / batch
    torch_call = min(torch_runs) / batch
    result = {
        "config": {
            "unet": UNET,
            "vae": VAE,
            "size": SIZE,
            "text_tokens": TEXT_TOKENS,
            "steps": steps,
            "batch": batch,
            "guidance": True,
            "repeats": repeats,
        },
        "jax_compile_s": first_timings["compile_s"],
        "jax_first_call_s": first_s,
        "jax_per_image_s": jax_call,
        "jax_sampling_per_image_s": jax_sample,
        "torch_per_image_s": torch_call,
        "torch_over_jax": torch_call / jax_call,
        "max_abs_pixel_diff": float(np.abs(jax_pixels - torch_pixels).max()),
        "runs_s": {
            "jax_call": [r[0] for r in jax_runs],
            "jax_sample": [r[1]["sample_s"] for r in jax_runs],
            "torch_call": torch_runs,
        },
    }
    if two_adapters is not None:
        result["two_adapters_masked"] = two_adapters
    return result


def bench_sd15_unet_step(latent: int, repeats: int) -> dict:
    """One guided step of an SD1.5-sized UNet: forward on batch 2 (uncond + cond), 77 text + 4 image tokens."""
    from diffusers import UNet2DConditionModel

    from ipadapter_jax.models.random_init import numpy_init
    from ipadapter_jax.models.scales import ip_scale_tree
    from ipadapter_jax.models.unet import IPUNet2DConditionModel
    from ipadapter_jax.weights.unet_config import abstract_ip_unet_params

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, latent, latent)).astype(np.float32)
    text = rng.standard_normal((2, TEXT_TOKENS, 768)).astype(np.float32)
    tokens = rng.standard_normal((2, 4, 768)).astype(np.float32)
    timesteps = np.array([500, 500], np.int32)

    unet = IPUNet2DConditionModel(**SD15_UNET)
    params = jax.device_put(numpy_init(abstract_ip_unet_params(unet)))
    scales = ip_scale_tree(params, 0.6)
    step = jax.jit(lambda p, s, x, t, c, i: unet.apply({"params": p, "ip_scale": s}, x, t, c, image_tokens=i).sample)
    args = (params, scales, jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(text), jnp.asarray(tokens))
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    # PyTorch: the same architecture; the IP branch is the same extra matmuls, so the plain UNet with 81 text
    # tokens stands in for it (no random adapter needs loading into an 860M-param UNet).
    torch_unet = UNet2DConditionModel(**SD15_UNET).eval()
    context = torch.from_numpy(np.concatenate([text, tokens], axis=1))

    def run_torch() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            torch_unet(torch.from_numpy(sample), torch.from_numpy(timesteps).long(), context)
        return time.perf_counter() - start

    def run_jax() -> float:
        start = time.perf_counter()
        compiled(*args).block_until_ready()
        return time.perf_counter() - start

    run_jax(), run_torch()  # warm-up
    jax_times, torch_times = [], []
    for _ in range(repeats):  # alternating, as in `bench_pipelines`
        jax_times.append(run_jax())
        torch_times.append(run_torch())
    return {
        "latent": latent,
        "runs_s": {"jax": jax_times, "torch": torch_times},
        "jax_compile_s": compile_s,
        "jax_step_s": min(jax_times),
        "torch_step_s": min(torch_times),
        "torch_over_jax": min(torch_times) / min(jax_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--multi", action="store_true", help="also time two adapters + masks vs one adapter")
    parser.add_argument("--sd15-unet", action="store_true", help="also time an SD1.5-sized UNet step")
    parser.add_argument("--sd15-latent", type=int, default=64, help="latent side for --sd15-unet (64 = 512 px)")
    parser.add_argument("--json", default="bench/pipeline_bench.json")
    args = parser.parse_args()

    kept = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    result = {
        **{key: value for key, value in kept.items() if key == "sd15_unet_step" and not args.sd15_unet},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_avg_at_start": os.getloadavg(),
        },
        "pipeline": bench_pipelines(args.steps, args.repeats, args.multi),
    }
    result["machine"]["load_avg_after_pipelines"] = os.getloadavg()
    p = result["pipeline"]
    print(f"{'':34}{'JAX':>10}{'PyTorch':>10}{'PyTorch/JAX':>13}")
    print(
        f"{'s per image, whole call':34}{p['jax_per_image_s']:10.3f}{p['torch_per_image_s']:10.3f}"
        f"{p['torch_over_jax']:13.2f}"
    )
    print(f"{'s per image, sampling+decode only':34}{p['jax_sampling_per_image_s']:10.3f}")
    print(f"{'compile (s, once per shape)':34}{p['jax_compile_s']:10.1f}")
    print(
        f"({p['config']['steps']} DDIM steps, guidance, {SIZE}x{SIZE}, batch {p['config']['batch']}; "
        f"max |JAX - PyTorch| pixel {p['max_abs_pixel_diff']:.1e})"
    )
    if args.multi:
        m = p["two_adapters_masked"]
        print(
            f"{'s per image, 1 adapter':34}{m['jax_one_per_image_s']:10.3f}{m['torch_one_per_image_s']:10.3f}"
            f"   (JAX sampling only {m['jax_one_sampling_per_image_s']:.3f})"
        )
        print(
            f"{'s per image, 2 adapters + masks':34}{m['jax_two_masked_per_image_s']:10.3f}"
            f"{m['torch_two_masked_per_image_s']:10.3f}{m['torch_over_jax_two_masked']:13.2f}"
            f"   (JAX sampling only {m['jax_two_masked_sampling_per_image_s']:.3f})"
        )
        print(
            f"{'2 adapters + masks / 1 adapter':34}"
            f"{m['jax_two_over_one_sampling']:10.3f}{m['torch_two_over_one']:10.3f}"
            "   (JAX: sampling; PyTorch: whole call)"
        )
    if args.sd15_unet:
        s = result["sd15_unet_step"] = bench_sd15_unet_step(args.sd15_latent, args.repeats)
        print(
            f"{'SD1.5 UNet step (s), batch 2':34}{s['jax_step_s']:10.2f}{s['torch_step_s']:10.2f}"
            f"{s['torch_over_jax']:13.2f}   (latent {s['latent']}, compile {s['jax_compile_s']:.0f} s)"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
