"""The log filter drops exactly diffusers'/transformers' Flax deprecation notices and nothing else."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

TRACE_TINY_UNET = """
import jax, jax.numpy as jnp
from diffusers import FlaxUNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging
unet = FlaxUNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
    cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 8, 8)), jnp.zeros((1,), jnp.int32),
    jnp.zeros((1, 1, 32))))
from transformers import CLIPVisionConfig, FlaxCLIPVisionModel
FlaxCLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    num_attention_heads=2, image_size=8, patch_size=4), _do_init=False)
diffusers_logging.get_logger("diffusers.models.some_module").warning("an unrelated diffusers warning")
transformers_logging.get_logger("transformers.some_module").warning("an unrelated transformers warning")
"""


def _stderr(prelude: str) -> str:
    code = textwrap.dedent(prelude) + TRACE_TINY_UNET
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


@pytest.mark.slow
def test_deprecation_lines_are_dropped_and_other_warnings_kept():
    without = _stderr("")
    with_filter = _stderr("import ipadapter_jax\n")
    # Without the filter diffusers logs one notice per Flax module set up (dozens for this tiny UNet).
    assert without.count("Flax classes are deprecated") > 10
    assert "TensorFlow and JAX classes are deprecated" in without
    assert "Flax classes are deprecated" not in with_filter
    assert "TensorFlow and JAX classes are deprecated" not in with_filter
    for line in ("an unrelated diffusers warning", "an unrelated transformers warning"):
        assert line in without and line in with_filter
