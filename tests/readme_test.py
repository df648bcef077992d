"""The README's Python snippets run as written, on tiny models saved under the names the README uses.

In a temporary folder: `stable-diffusion-v1-5/` (a tiny SD1.5-shaped diffusers pipeline saved by diffusers, PyTorch
weights), `image_encoder/` (a tiny `CLIPVisionModelWithProjection`), `ip-adapter_sd15.safetensors` (a random
official-layout base adapter for that UNet) and `prompt.png`. Each ```python block of README.md is executed there,
in order, and what it computes is checked.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from ipadapter_jax.testing import pipeline_fixtures

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.slow


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    folder = root / "stable-diffusion-v1-5"
    pipeline_fixtures.save_pipeline(folder, "sd15")
    shutil.copytree(folder / "image_encoder", root / "image_encoder")
    shutil.copyfile(pipeline_fixtures.adapter_file(folder, "base"), root / "ip-adapter_sd15.safetensors")
    pipeline_fixtures.test_image(0, (120, 90)).save(root / "prompt.png")
    return root


def run_block(index: int, workspace: Path, monkeypatch) -> dict:
    blocks = python_blocks()
    assert len(blocks) >= 2, f"README.md has {len(blocks)} Python blocks"
    monkeypatch.chdir(workspace)
    namespace: dict = {}
    exec(compile(blocks[index], f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    return namespace


def test_the_loading_api_snippet_gives_a_noise_prediction(workspace, monkeypatch):
    namespace = run_block(0, workspace, monkeypatch)
    noise, tokens = np.asarray(namespace["noise"]), np.asarray(namespace["tokens"])
    assert noise.shape == (1, 4, 64, 64) and np.all(np.isfinite(noise))
    assert tokens.shape == (1, 4, 32)  # 4 tokens of the tiny UNet's 32-d cross-attention
    # The image tokens act: at scale 0 (the plain UNet) the prediction differs.
    base, unet_params = namespace["base"], namespace["unet_params"]
    from ipadapter_jax.models.scales import ip_scale_tree

    plain = base.unet.apply(
        {"params": unet_params, "ip_scale": ip_scale_tree(unet_params, 0.0)},
        namespace["latents"],
        999,
        namespace["text"],
        image_tokens=tokens,
    ).sample
    assert np.abs(np.asarray(plain) - noise).max() > 1e-3


@pytest.fixture(scope="module")
def pipeline_block(workspace) -> dict:
    """The pipeline block's namespace (its `pipe` and `image` serve the block after it)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_block(1, workspace, monkeypatch)


def test_the_pipeline_snippet_generates_images(workspace, pipeline_block):
    out = pipeline_block["out"]
    assert len(out.images) == 3 and out.settings["per_prompt_images"] and out.settings["seed"] == [0, 1, 2]
    assert (workspace / "sample.png").is_file()


def test_the_several_adapters_snippet_generates_with_masks(workspace, pipeline_block, monkeypatch):
    """The multi-adapter block runs after the pipeline block, on its `pipe` and `image`."""
    monkeypatch.chdir(workspace)
    namespace = dict(pipeline_block)
    exec(compile(python_blocks()[2], "README.md python block 2", "exec"), namespace)  # noqa: S102
    out = namespace["out"]
    assert out.settings["masks"] == [2, 0] and out.settings["embeds_scaling"] == ["v_only", "k_v"]
    assert out.settings["num_prompt_images"] == [2, 1] and len(namespace["pipe"].adapters) == 1
