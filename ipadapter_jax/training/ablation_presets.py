"""The paper's ablations as `ipadapter-jax ablate --preset NAME` presets: variant name -> config overrides (the
`--config.x=y` syntax), applied on top of the `demo` preset (the embedded tiny base) by
`ipadapter_jax.training.ablation`.

    designs  decoupled cross-attention (the paper's adapter) vs the "simple adapter": image tokens concatenated
             to the text tokens in the frozen text cross-attention (Fig. 10; `model.design`)
    tokens   base (4 tokens from the image embedding) vs Plus (16 Resampler queries over the penultimate hidden
             states) vs Full (one token per hidden state: the tiny encoder's 1 + 7 x 7 = 50) (Fig. 11)
    drops    the reference's condition drops (5% image, 5% text, 5% both) vs none

The tiny presets' Plus Resampler is 64 wide and 1 deep (~60k params): the reference's (1280 wide, depth 4 for a
non-768 cross-attention) would be ~80M params on a 32-wide base.
"""

from __future__ import annotations

TINY_RESAMPLER = ("model.resampler_width=64", "model.resampler_depth=1")
TINY_FULL_TOKENS = 50  # 1 + (224 / 32) ** 2: the tiny image encoder's hidden states

ABLATION_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "designs": {
        "decoupled": ("model.design=decoupled",),
        "simple": ("model.design=simple",),
    },
    "tokens": {
        "base": ("model.adapter_kind=base", "model.num_tokens=4"),
        "plus": ("model.adapter_kind=plus", "model.num_tokens=16", *TINY_RESAMPLER),
        "full": ("model.adapter_kind=full", f"model.num_tokens={TINY_FULL_TOKENS}"),
    },
    "drops": {
        "reference_drops": ("data.drop_rates=(0.05, 0.05, 0.05)",),
        "no_drops": ("data.drop_rates=(0.0, 0.0, 0.0)",),
    },
}
