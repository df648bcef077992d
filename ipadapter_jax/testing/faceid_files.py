"""Random FaceID / FaceID Plus adapters in the official layout (h94/IP-Adapter-FaceID), written by hand from the
PyTorch UNet's attention processors (as diffusers' `load_ip_adapter` numbers them), not by our converters.

`image_proj` keys are the official modules' own (`MLPProjModel` of ip_adapter_faceid: `proj.0`, `proj.2`, `norm`;
`ProjModelFaceIdPlus`: those and `perceiver_resampler.*`); `ip_adapter` holds `to_k_ip`/`to_v_ip` for every
cross-attention processor and a rank-`LORA_RANK` `to_{q,k,v,out}_lora.{down,up}` for every attention processor.
Shapes diffusers fixes for FaceID Plus: depth 4, head size 64, feed-forward x4, identity MLP x2, 4 tokens.
"""

from __future__ import annotations

import numpy as np

from ipadapter_jax.testing import tiny

ID_DIM = 24  # the identity embedding's width (ArcFace's is 512; diffusers reads it off the file)
LORA_RANK = 4
NUM_TOKENS = 4


def random_faceid_adapter(unet, kind: str, seed: int = 3, clip_hidden: int = tiny.PLUS_HIDDEN) -> dict:
    """{"image_proj": ..., "ip_adapter": ...} for `kind` "faceid" or "faceid-plus" fitting the PyTorch `unet`."""
    rng = np.random.default_rng(seed)
    cross = unet.config.cross_attention_dim

    def linear(prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> dict:
        state = {f"{prefix}.weight": rng.standard_normal((out_dim, in_dim)) * in_dim**-0.5}
        if bias:
            state[f"{prefix}.bias"] = rng.standard_normal(out_dim) * 0.1
        return state

    def norm(prefix: str, dim: int) -> dict:
        return {
            f"{prefix}.weight": 1 + rng.standard_normal(dim) * 0.1,
            f"{prefix}.bias": rng.standard_normal(dim) * 0.1,
        }

    dim = cross  # the official FaceID Plus: resampler width = cross-attention width (the v2 shortcut adds them)
    image_proj = {**linear("proj.0", 2 * ID_DIM, ID_DIM), **linear("proj.2", NUM_TOKENS * dim, 2 * ID_DIM),
                  **norm("norm", dim)}  # fmt: skip
    if kind == "faceid-plus":
        inner = 64  # one head of 64
        resampler = "perceiver_resampler"
        image_proj.update(linear(f"{resampler}.proj_in", dim, clip_hidden))
        image_proj.update({**linear(f"{resampler}.proj_out", cross, dim), **norm(f"{resampler}.norm_out", cross)})
        for i in range(4):
            layer = f"{resampler}.layers.{i}"
            image_proj.update({**norm(f"{layer}.0.norm1", dim), **norm(f"{layer}.0.norm2", dim),
                               **linear(f"{layer}.0.to_q", inner, dim, False),
                               **linear(f"{layer}.0.to_kv", 2 * inner, dim, False),
                               **linear(f"{layer}.0.to_out", dim, inner, False), **norm(f"{layer}.1.0", dim),
                               **linear(f"{layer}.1.1", 4 * dim, dim, False),
                               **linear(f"{layer}.1.3", dim, 4 * dim, False)})  # fmt: skip
    ip_adapter = {}
    modules = dict(unet.named_modules())
    for layer_id, name in enumerate(unet.attn_processors):
        attention = modules[name[: -len(".processor")]]
        if name.endswith("attn2.processor"):
            for name_ip in ("to_k_ip", "to_v_ip"):
                ip_adapter.update(linear(f"{layer_id}.{name_ip}", attention.to_k.out_features, cross, False))
        for projection, module in (("to_q", attention.to_q), ("to_k", attention.to_k), ("to_v", attention.to_v),
                                   ("to_out", attention.to_out[0])):  # fmt: skip
            ip_adapter[f"{layer_id}.{projection}_lora.down.weight"] = (
                rng.standard_normal((LORA_RANK, module.in_features)) * 0.2
            )
            ip_adapter[f"{layer_id}.{projection}_lora.up.weight"] = (
                rng.standard_normal((module.out_features, LORA_RANK)) * 0.2
            )
    as_float = {k: np.asarray(v, np.float32) for k, v in image_proj.items()}
    return {"image_proj": as_float, "ip_adapter": {k: np.asarray(v, np.float32) for k, v in ip_adapter.items()}}
