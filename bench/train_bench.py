"""Training step: our jitted JAX step vs the PyTorch reference step, side by side on this machine.

Config (REFERENCE.md s.5's CPU benchmark UNet): block_out_channels (64, 128, 256, 256), layers_per_block 2,
cross_attention_dim 256, batch 4, 32x32 latents, 77 text + 4 image tokens, fp32. Both sides train the base
adapter (projection + K'/V') on a cached (encoded) batch: JAX with `training.step.make_train_step`, PyTorch
with diffusers' UNet + `IPAdapterAttnProcessor2_0` + `torch.optim.AdamW`. Median of N timed steps after
warm-up (JAX: after compilation, reported separately).

Also: FLOPs of the SD1.5 UNet forward (64x64 latents, 77+4 tokens, batch 1) and of one SD1.5 training step
from XLA's cost analysis of the compiled programs (abstract params: nothing allocated), vs REFERENCE.md s.4.

    python bench/train_bench.py [--steps 5] [--skip-sd15] [--out bench/train_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ipadapter_jax  # noqa: E402,F401
from conversion.image_proj import load_image_proj  # noqa: E402
from conversion.ip_adapter import ip_layers_from_official  # noqa: E402
from conversion.torch_layout import torch_state_to_flax  # noqa: E402
from ipadapter_jax.adapter import split_unet_params  # noqa: E402
from ipadapter_jax.random_init import abstract_params  # noqa: E402
from ipadapter_jax.unet import IPUNet2DConditionModel  # noqa: E402
from training.components import SD_SCHEDULE, alphas_cumprod  # noqa: E402
from training.step import (  # noqa: E402
    StepModels,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
)

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
BATCH, TOKENS, CLIP_DIM = 4, 77, 1024


def median_seconds(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_step(steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    torch_unet = UNet2DConditionModel(**BENCH_UNET)
    base_state = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    rng = np.random.default_rng(0)
    cross = BENCH_UNET["cross_attention_dim"]
    official = {"image_proj": {
        "proj.weight": rng.standard_normal((4 * cross, CLIP_DIM)).astype(np.float32) * CLIP_DIM**-0.5,
        "proj.bias": np.zeros(4 * cross, np.float32),
        "norm.weight": np.ones(cross, np.float32),
        "norm.bias": np.zeros(cross, np.float32),
    }, "ip_adapter": {}}
    modules = dict(torch_unet.named_modules())
    for layer_id, name in enumerate(torch_unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = modules[name[: -len(".processor")]]
            official["ip_adapter"][f"{layer_id}.to_k_ip.weight"] = attn.to_k.weight.detach().numpy().copy()
            official["ip_adapter"][f"{layer_id}.to_v_ip.weight"] = attn.to_v.weight.detach().numpy().copy()
    latents = rng.standard_normal((BATCH, 4, 32, 32)).astype(np.float32)
    text = rng.standard_normal((BATCH, TOKENS, cross)).astype(np.float32)
    embeds = rng.standard_normal((BATCH, CLIP_DIM)).astype(np.float32)

    # --- JAX
    unet = IPUNet2DConditionModel(**BENCH_UNET)
    abstract = abstract_params(unet, jnp.zeros((1, 4, 32, 32)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, cross)),
                               image_tokens=jnp.zeros((1, 4, cross)))
    _, image_proj, image_proj_params = load_image_proj(official["image_proj"])
    frozen = {
        "unet": torch_state_to_flax(base_state, split_unet_params(abstract)[0], source="bench UNet"),
        "null_text_embeds": np.zeros((1, TOKENS, cross), np.float32),
        "null_image_embeds": np.zeros((1, CLIP_DIM), np.float32),
        "alphas_cumprod": alphas_cumprod(**SD_SCHEDULE),
        "vae_scaling_factor": np.float32(1.0),
    }
    adapter = {"image_proj": image_proj_params, "ip_layers": ip_layers_from_official(official["ip_adapter"], abstract)}
    schedule = learning_rate_schedule(1e-4)
    optimizer = make_optimizer(schedule)
    step = jax.jit(make_train_step(StepModels(unet, image_proj), optimizer, schedule), donate_argnums=(0,))
    batch = {"latent_mean": latents, "latent_std": np.zeros_like(latents), "text_embeds": text,
             "image_embeds": embeds, "drop_image": np.zeros(BATCH, bool), "drop_text": np.zeros(BATCH, bool)}
    batch = jax.device_put(batch)
    frozen = jax.device_put(frozen)
    state = init_train_state(jax.device_put(adapter), optimizer, seed=0)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def jax_step():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    jax_step()
    jax_s = median_seconds(jax_step, steps)

    # --- PyTorch reference step (the reference recipe's loop body)
    torch_unet._load_ip_adapter_weights([{s: {k: torch.from_numpy(v) for k, v in d.items()} for s, d in official.items()}])
    torch_unet.train()
    for p in torch_unet.parameters():
        p.requires_grad_(False)
    trained = [p for n, p in torch_unet.named_parameters() if "to_k_ip" in n or "to_v_ip" in n or "encoder_hid_proj" in n]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=1e-2)
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    t_latents, t_text, t_embeds = map(torch.from_numpy, (latents, text, embeds))

    def torch_step():
        noise = torch.randn_like(t_latents)
        t = torch.randint(0, 1000, (BATCH,))
        noisy = scheduler.add_noise(t_latents, noise, t)
        pred = torch_unet(noisy, t, t_text, added_cond_kwargs={"image_embeds": [t_embeds[:, None]]}).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad()

    torch_step()
    torch_s = median_seconds(torch_step, steps)
    return {
        "config": "UNet (64,128,256,256) x2 layers, cross 256, batch 4, 32x32 latents, 77+4 tokens, fp32",
        "jax_compile_s": compile_s,
        "jax_step_s": jax_s,
        "torch_step_s": torch_s,
        "jax_over_torch": jax_s / torch_s,
        "jax_images_per_s": BATCH / jax_s,
        "torch_images_per_s": BATCH / torch_s,
    }


def bench_sd15_flops() -> dict:
    """XLA cost analysis of SD1.5 programs on abstract params (compiles, allocates no weights)."""
    unet = IPUNet2DConditionModel(**SD15_UNET)
    cross = 768
    abstract = abstract_params(unet, jnp.zeros((1, 4, 64, 64)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, cross)),
                               image_tokens=jnp.zeros((1, 4, cross)))
    sample = jax.ShapeDtypeStruct((1, 4, 64, 64), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    text = jax.ShapeDtypeStruct((1, TOKENS, cross), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, 4, cross), jnp.float32)

    def forward(params, sample, t, text, tokens):
        return unet.apply({"params": params}, sample, t, text, image_tokens=tokens).sample

    def train_grad(ip_layers, frozen, sample, t, text, tokens):
        from ipadapter_jax.adapter import merge_unet_params

        def loss(ip_layers):
            return jnp.mean(forward(merge_unet_params(frozen, ip_layers), sample, t, text, tokens) ** 2)

        return jax.grad(loss)(ip_layers)

    def flops(fn, *args) -> float:
        analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        return float(analysis["flops"])

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
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "train_bench.json"))
    args = parser.parse_args()
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"jax {jax.__version__} on {jax.devices()[0].device_kind}", **bench_step(args.steps)}
    if not args.skip_sd15:
        result.update(bench_sd15_flops())
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
