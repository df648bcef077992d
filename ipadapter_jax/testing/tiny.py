"""Tiny SD1.5- and SDXL-shaped UNets and random official-layout adapters, shared by the tests.

The PyTorch model is the reference: tests build it with diffusers, convert its weights into our Flax model
and compare outputs. Official adapter state dicts are generated from the *PyTorch* UNet's attention
processor order (as diffusers' loader numbers them), independently of our own layer enumeration.
"""

from __future__ import annotations

import numpy as np

# Shared by diffusers' PyTorch and Flax UNets (Flax's GroupNorm is fixed at 32 groups: channels % 32 == 0).
SD15_TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=4,  # diffusers' Flax and PyTorch UNets both read this as the number of heads
    cross_attention_dim=32,
)

SDXL_TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=(1, 2, 2),
    use_linear_projection=True,
    cross_attention_dim=64,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text (32) + 6 micro-conditions x 8
)

SDXL_TEXT_EMBEDS_DIM = 32
CONFIGS = {"sd15": SD15_TINY, "sdxl": SDXL_TINY}


def torch_unet(config: dict, seed: int = 0):
    """diffusers' PyTorch `UNet2DConditionModel` with random weights (eval mode, fp32)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


# Plus (Resampler) adapters of the tiny tests read (B, [num_images,] PLUS_TOKENS, PLUS_HIDDEN) features.
PLUS_TOKENS, PLUS_HIDDEN = 5, 40


def random_official_adapter(unet, clip_dim: int = 48, num_tokens: int = 4, seed: int = 1, kind: str = "base") -> dict:
    """A random adapter in the official layout: base ("ip-adapter_sd15"-style, `clip_dim` image embeddings)
    or Plus (a 4-layer Resampler with `num_tokens` queries over PLUS_HIDDEN-d features).

    The `ip_adapter` section is numbered as diffusers' loader numbers attention processors (the i-th entry of
    `unet.attn_processors` has id i), independently of our own layer enumeration.
    """
    rng = np.random.default_rng(seed)
    cross = unet.config.cross_attention_dim
    ip_adapter = {}
    modules = dict(unet.named_modules())
    for layer_id, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            inner = modules[name[: -len(".processor")]].to_k.out_features
            for name_ip in ("to_k_ip", "to_v_ip"):
                ip_adapter[f"{layer_id}.{name_ip}.weight"] = (rng.standard_normal((inner, cross)) * cross**-0.5).astype(
                    np.float32
                )
    if kind == "base":
        image_proj = {
            "proj.weight": (rng.standard_normal((num_tokens * cross, clip_dim)) * clip_dim**-0.5).astype(np.float32),
            "proj.bias": (rng.standard_normal(num_tokens * cross) * 0.1).astype(np.float32),
            "norm.weight": (1 + rng.standard_normal(cross) * 0.1).astype(np.float32),
            "norm.bias": (rng.standard_normal(cross) * 0.1).astype(np.float32),
        }
    else:
        image_proj = _random_resampler_state(cross, num_tokens, seed)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _random_resampler_state(output_dim: int, num_queries: int, seed: int) -> dict:
    """Official-layout Resampler weights (random)."""
    from ipadapter_jax.models.image_proj import Resampler
    from ipadapter_jax.models.random_init import numpy_init
    from ipadapter_jax.weights.image_proj_keys import flax_to_official, param_shapes

    # depth 4: diffusers' loader builds every Plus projection with 4 layers.
    module = Resampler(
        dim=32, depth=4, heads=2, num_queries=num_queries, embedding_dim=PLUS_HIDDEN, output_dim=output_dim
    )
    params = numpy_init(param_shapes(module), seed=seed)
    state = flax_to_official(params)
    rng = np.random.default_rng(seed + 1)
    # numpy_init leaves norms at identity and biases at 0; move every 1-d param so none is trivial.
    return {
        k: (v + rng.standard_normal(v.shape) * 0.1).astype(np.float32) if v.ndim == 1 else v for k, v in state.items()
    }


def torch_pipeline(torch_unet, sdxl: bool = False):
    """A real diffusers `StableDiffusion(XL)Pipeline` around `torch_unet`, other parts tiny and random.

    For `pipe.load_ip_adapter(...)` and UNet calls through the pipeline; its tokenizer is None, so the text
    path is never used.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
    )
    text_config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000
    )
    common = dict(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=None,
        unet=torch_unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        image_encoder=None,
        feature_extractor=None,
    )
    if sdxl:
        return StableDiffusionXLPipeline(
            **common, text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer_2=None
        )
    return StableDiffusionPipeline(**common, safety_checker=None, requires_safety_checker=False)
