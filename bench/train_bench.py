"""Training step speed and memory: our jitted JAX step vs the PyTorch reference step, side by side on this machine.

Both sides train the base adapter (projection + K'/V', the paper's init) on a cached (encoded) batch: JAX with
`ipadapter_jax.training.step.make_train_step` as a training run compiles it, PyTorch with diffusers' UNet +
`IPAdapterAttnProcessor2_0` + `torch.optim.AdamW` (REFERENCE.md s.3's loop body). Each measurement runs in a
fresh process, so its peak resident memory (VmHWM) is its own. Reported: median of `--steps` timed steps after
one warm-up step (JAX: compile time separately), images/s, memory after building (weights, optimizer state,
batch) and peak.

Configs:
  bench   REFERENCE.md s.5's CPU benchmark UNet: channels (64, 128, 256, 256), 2 layers per block, cross 256,
          batch 4, 32x32 latents, 77 text + 4 image tokens, fp32 (the JAX/PyTorch ratio);
  sd15    the SD1.5 UNet (859.5M params, random weights) at 256 px (32x32 latents), batch `--sd15-batch`,
          fp32 and bf16 compute (PyTorch: CPU autocast); params and optimizer state fp32 on both sides.
JAX runs both with diffusers' default attention and with `config.model.memory_efficient_attention`
("jax-chunked-attn": the attention scores are computed in chunks, never whole).

On one NVIDIA GPU: `bench/train_bench_gpu.py` (SD1.5 at 512 px, bf16, with MFU).
Also: FLOPs of the SD1.5 UNet forward (64x64 latents, 77+4 tokens, batch 1) and of one SD1.5 training step
from XLA's cost analysis of the compiled programs (abstract params: nothing allocated), vs REFERENCE.md s.4.

    python bench/train_bench.py [--steps 3] [--sd15-batch 2] [--skip-sd15] [--out bench/train_bench.json]

The measurement processes inherit XLA_FLAGS, so XLA:CPU options can be compared with `--measure`, e.g.
`XLA_FLAGS=--xla_cpu_experimental_onednn_custom_call=true python bench/train_bench.py --measure jax,bench,float32,4,3`
(tried: that, `--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY` and YNNPACK dot/eltwise
fusion: within +-10% of the default, 2.73 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ipadapter_jax  # noqa: E402,F401

# isort: split
from ipadapter_jax.models.adapter import split_unet_params  # noqa: E402
from ipadapter_jax.models.image_proj import ImageProjModel  # noqa: E402
from ipadapter_jax.models.random_init import abstract_params, numpy_init  # noqa: E402
from ipadapter_jax.models.scheduler_base import training_alphas_cumprod  # noqa: E402
from ipadapter_jax.models.unet import IPUNet2DConditionModel  # noqa: E402
from ipadapter_jax.training.step import (  # noqa: E402
    StepModels,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
)
from ipadapter_jax.weights.image_proj_keys import param_shapes  # noqa: E402
from ipadapter_jax.weights.tiny_base import SCHEDULER as SD_SCHEDULER  # noqa: E402  (SD1.5's scheduler config)

BENCH_UNET = dict(
    sample_size=32,
    block_out_channels=(64, 128, 256, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=256,
)
SD15_UNET = dict(BENCH_UNET, sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
CONFIGS = {"bench": (BENCH_UNET, 32), "sd15": (SD15_UNET, 32), "sd15_512": (SD15_UNET, 64)}  # (UNet kwargs, latent)
BENCH_BATCH, TOKENS, CLIP_DIM = 4, 77, 1024
JAX_CHUNKED = "jax-chunked-attn"  # our step with config.model.memory_efficient_attention
JAX_CUDNN = "jax-cudnn-attn"  # our step with config.model.attention_implementation = "cudnn"
JAX_UNET_OPTIONS = {  # framework name -> the UNet options of `ipadapter_jax.training.components.step_models`
    "jax": {},
    JAX_CHUNKED: {"use_memory_efficient_attention": True},
    JAX_CUDNN: {"attention_implementation": "cudnn"},
}
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # datasheet peaks (SXM), by a substring of the device kind


def median_seconds(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak so far) of this process, MiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def adapter_inputs(cross: int, batch: int, latent: int, seed: int = 0) -> dict:
    """One cached (encoded) batch: VAE posterior mean (B, 4, latent, latent), text (B, 77, cross), embeds (B, 1024)."""
    rng = np.random.default_rng(seed)
    return {
        "latent_mean": rng.standard_normal((batch, 4, latent, latent)).astype(np.float32),
        "text_embeds": rng.standard_normal((batch, TOKENS, cross)).astype(np.float32),
        "image_embeds": rng.standard_normal((batch, CLIP_DIM)).astype(np.float32),
    }


def jax_step_fn(unet_kwargs: dict, batch: int, latent: int, dtype: str, unet_options: dict):
    """Our compiled train step (`ipadapter_jax.training.step`, as a training run builds it) -> (step(), compile
    seconds, FLOPs per step by XLA's cost analysis). `unet_options`: the attention options of `JAX_UNET_OPTIONS`."""
    cross = unet_kwargs["cross_attention_dim"]
    unet = IPUNet2DConditionModel(**unet_kwargs, dtype=jnp.dtype(dtype), **unet_options)
    abstract = abstract_params(
        unet,
        jnp.zeros((1, 4, latent, latent)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, cross)),
        image_tokens=jnp.zeros((1, 4, cross)),
    )
    frozen_unet, ip_layers = split_unet_params(numpy_init(abstract, seed=0))  # params float32, as in training
    frozen_unet = jax.device_put(frozen_unet)  # and no host copy kept (as a training run does)
    image_proj = ImageProjModel(
        cross_attention_dim=cross, clip_embeddings_dim=CLIP_DIM, num_tokens=4, dtype=jnp.dtype(dtype)
    )
    frozen = {
        "unet": frozen_unet,
        "null_text_embeds": np.zeros((1, TOKENS, cross), np.float32),
        "null_image_embeds": np.zeros((1, CLIP_DIM), np.float32),
        "alphas_cumprod": training_alphas_cumprod(SD_SCHEDULER),
        "vae_scaling_factor": np.float32(0.18215),
    }
    inputs = adapter_inputs(cross, batch, latent)
    cached = dict(
        inputs,
        latent_std=np.zeros_like(inputs["latent_mean"]),
        drop_image=np.zeros(batch, bool),
        drop_text=np.zeros(batch, bool),
    )
    adapter = {"image_proj": numpy_init(param_shapes(image_proj), seed=1), "ip_layers": ip_layers}
    schedule = learning_rate_schedule(1e-4)
    optimizer = make_optimizer(schedule)
    step = jax.jit(make_train_step(StepModels(unet, image_proj), optimizer, schedule), donate_argnums=(0,))
    frozen, cached = jax.device_put(frozen), jax.device_put(cached)
    holder = {"state": init_train_state(jax.device_put(adapter), optimizer, seed=0)}
    start = time.perf_counter()
    lowered = step.lower(holder["state"], frozen, cached)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, cached)
        jax.block_until_ready(metrics["loss"])

    return run, compile_s, cost_flops(lowered)


def cost_flops(program: jax.stages.Lowered | jax.stages.Compiled) -> float | None:
    """FLOPs of a program by XLA's cost analysis. Count the lowered program for model FLOPs: after compilation
    XLA:GPU's convolutions and matmuls are library calls that count 0 (an SD1.5 step: 1.7 TFLOP for batch 8),
    as do cuDNN attention calls before and after. None where the backend gives no analysis."""
    analysis = program.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"]) if analysis else None


def torch_step_fn(unet_kwargs: dict, batch: int, latent: int, dtype: str):
    """The PyTorch reference step (REFERENCE.md s.3's loop body): diffusers UNet + IPAdapterAttnProcessor2_0 +
    AdamW on the projection and K'/V', on the GPU when there is one; `dtype` bfloat16 = autocast, as the
    reference's mixed precision (fp32 weights)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_kwargs)
    cross = unet_kwargs["cross_attention_dim"]
    rng = np.random.default_rng(0)
    official = {
        "image_proj": {
            "proj.weight": rng.standard_normal((4 * cross, CLIP_DIM)).astype(np.float32) * CLIP_DIM**-0.5,
            "proj.bias": np.zeros(4 * cross, np.float32),
            "norm.weight": np.ones(cross, np.float32),
            "norm.bias": np.zeros(cross, np.float32),
        },
        "ip_adapter": {},
    }
    modules = dict(unet.named_modules())
    for layer_id, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):  # K'/V' start as copies of K/V (the paper's init)
            attn = modules[name[: -len(".processor")]]
            official["ip_adapter"][f"{layer_id}.to_k_ip.weight"] = attn.to_k.weight.detach().numpy().copy()
            official["ip_adapter"][f"{layer_id}.to_v_ip.weight"] = attn.to_v.weight.detach().numpy().copy()
    unet._load_ip_adapter_weights([{s: {k: torch.tensor(v) for k, v in d.items()} for s, d in official.items()}])
    unet.to(device)
    unet.train()
    unet.requires_grad_(False)
    trained = [p for n, p in unet.named_parameters() if "to_k_ip" in n or "to_v_ip" in n or "encoder_hid_proj" in n]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=1e-2)
    scheduler = DDPMScheduler(
        **{k: SD_SCHEDULER[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    )
    inputs = {k: torch.from_numpy(v).to(device) for k, v in adapter_inputs(cross, batch, latent).items()}
    latents = inputs["latent_mean"] * 0.18215
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        with autocast:
            pred = unet(
                noisy, t, inputs["text_embeds"], added_cond_kwargs={"image_embeds": [inputs["image_embeds"][:, None]]}
            ).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()

    return run, 0.0, None


def measure(framework: str, config: str, dtype: str, batch: int, steps: int) -> dict:
    """One (framework, config, dtype) measurement; runs in a fresh process so its peak memory is its own."""
    unet_kwargs, latent = CONFIGS[config]
    base_mib = memory_mib("VmRSS")
    if framework == "torch":
        run, compile_s, flops = torch_step_fn(unet_kwargs, batch, latent, dtype)
    else:
        run, compile_s, flops = jax_step_fn(unet_kwargs, batch, latent, dtype, JAX_UNET_OPTIONS[framework])
    built_mib = memory_mib("VmRSS")
    run()  # warm-up (PyTorch allocator, XLA thunks)
    build_peak_mib = memory_mib("VmHWM")  # JAX: XLA's compilation is the peak here
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM: the next peak is the training steps' own
        f.write("5")
    seconds = median_seconds(run, steps)
    return {
        "framework": framework,
        "config": config,
        "dtype": dtype,
        "batch": batch,
        "compile_s": compile_s,
        "step_s": seconds,
        "images_per_s": batch / seconds,
        "xla_flops": flops,
        "device_peak_mib": device_peak_mib(framework),
        "built_mib": built_mib - base_mib,  # weights + optimizer state + batch (+ the compiled program)
        "build_peak_mib": build_peak_mib,  # whole process, interpreter and libraries included
        "step_peak_mib": memory_mib("VmHWM"),  # whole process, during the timed steps
        "process_base_mib": base_mib,
    }


def device_peak_mib(framework: str) -> float | None:
    """Peak accelerator memory of this process (allocator statistics), MiB; None on a CPU."""
    if framework == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return stats["peak_bytes_in_use"] / 2**20 if stats else None


def measure_in_subprocess(*args, timeout: float | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", ",".join(map(str, args))]
    print("  $", " ".join(cmd[2:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_sd15_flops() -> dict:
    """XLA cost analysis of SD1.5 programs on abstract params (compiles, allocates no weights)."""
    unet = IPUNet2DConditionModel(**SD15_UNET)
    cross = 768
    abstract = abstract_params(
        unet,
        jnp.zeros((1, 4, 64, 64)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, cross)),
        image_tokens=jnp.zeros((1, 4, cross)),
    )
    sample = jax.ShapeDtypeStruct((1, 4, 64, 64), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    text = jax.ShapeDtypeStruct((1, TOKENS, cross), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, 4, cross), jnp.float32)

    def forward(params, sample, t, text, tokens):
        return unet.apply({"params": params}, sample, t, text, image_tokens=tokens).sample

    def train_grad(ip_layers, frozen, sample, t, text, tokens):
        from ipadapter_jax.models.adapter import merge_unet_params

        def loss(ip_layers):
            return jnp.mean(forward(merge_unet_params(frozen, ip_layers), sample, t, text, tokens) ** 2)

        return jax.grad(loss)(ip_layers)

    def flops(fn, *args) -> float:
        return cost_flops(jax.jit(fn).lower(*args).compile())

    frozen, ip_layers = split_unet_params(abstract)
    forward_flops = flops(forward, abstract, sample, t, text, tokens)
    train_flops = flops(train_grad, ip_layers, frozen, sample, t, text, tokens)
    return {
        "sd15_forward_gflop": forward_flops / 1e9,
        "sd15_train_step_gflop": train_flops / 1e9,
        "train_over_forward": train_flops / forward_flops,
        "reference_forward_gflop": 798,
        "reference_train_step_gflop": 1666,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sd15-batch", type=int, default=2)
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: framework,config,dtype,batch,steps
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "train_bench.json"), help="JSON output"
    )
    args = parser.parse_args()
    if args.measure:
        framework, config, dtype, batch, steps = args.measure.split(",")
        print(json.dumps(measure(framework, config, dtype, int(batch), int(steps))))
        return
    load_average = os.getloadavg()
    runs = [(fw, "bench", "float32", BENCH_BATCH) for fw in ("jax", JAX_CHUNKED, "torch")]
    if not args.skip_sd15:
        runs += [(fw, "sd15", "float32", args.sd15_batch) for fw in ("jax", JAX_CHUNKED, "torch")]
        runs += [(fw, "sd15", "bfloat16", args.sd15_batch) for fw in ("jax", "torch")]
    rows = [measure_in_subprocess(*run, args.steps) for run in runs]
    print(
        f"\n{'framework':<16} {'config':<6} {'dtype':<8} {'batch':>5} {'compile s':>9} {'step s':>8} "
        f"{'images/s':>8} {'built MiB':>9} {'build peak':>10} {'step peak':>9}"
    )
    for r in rows:
        print(
            f"{r['framework']:<16} {r['config']:<6} {r['dtype']:<8} {r['batch']:>5} {r['compile_s']:>9.1f} "
            f"{r['step_s']:>8.2f} {r['images_per_s']:>8.3f} {r['built_mib']:>9.0f} {r['build_peak_mib']:>10.0f} "
            f"{r['step_peak_mib']:>9.0f}"
        )
    ratios = {}
    for r in rows:
        if r["framework"] != "torch":
            torch_row = next(
                t
                for t in rows
                if t["framework"] == "torch"
                and (t["config"], t["dtype"], t["batch"]) == (r["config"], r["dtype"], r["batch"])
            )
            key = f"{r['config']}_{r['dtype']}_{r['framework']}_over_torch_step_time"
            ratios[key] = r["step_s"] / torch_row["step_s"]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}",
        "load_average_at_start": load_average,
        "runs": rows,
        **dict(sorted(ratios.items())),
    }
    if not args.skip_sd15:
        result.update(bench_sd15_flops())
    for key, value in result.items():
        if key != "runs":
            print(f"{key:<45}  {value:.3f}" if isinstance(value, float) else f"{key:<45}  {value}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
