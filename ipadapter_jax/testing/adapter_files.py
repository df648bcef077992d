"""Tiny SD1.5-/SDXL-shaped UNets in PyTorch and Flax with random official-layout adapters (base, Plus, Full), and
writers of official files the way the reference tools write them: the fixtures of the adapter-file tests."""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
import torch

from ipadapter_jax.models.adapter import merge_unet_params, split_unet_params
from ipadapter_jax.models.random_init import numpy_init
from ipadapter_jax.models.scales import ip_scale_tree
from ipadapter_jax.testing import tiny
from ipadapter_jax.weights import unet_config
from ipadapter_jax.weights.image_proj_keys import (
    CLIP_TOKENS,
    ImageProjSpec,
    build_image_proj,
    flax_to_official,
    param_shapes,
)
from ipadapter_jax.weights.official_layout import adapter_from_official
from ipadapter_jax.weights.torch_layout import torch_state_to_flax

BATCH, TEXT_TOKENS, CLIP_DIM, NUM_TOKENS, SCALE = 2, 7, 48, 4, 0.7
RTOL = 1e-4
KINDS = ("base", "plus", "full")
SUFFIX = {"safetensors": ".safetensors", "bin": ".bin"}
# Relative rounding error bound of round-to-nearest-even; fp16 values below 2**-14 are subnormal (absolute bound).
PRECISION = {"fp16": (2.0**-11, 2.0**-25), "bf16": (2.0**-8, 0.0)}


class Model:
    """One tiny config: the pristine PyTorch UNet, the same weights in our Flax IP-UNet, our adapters (base, Plus,
    Full) with their image projection modules, and the inputs of one UNet step."""

    def __init__(self, name: str):
        self.name, self.config = name, tiny.CONFIGS[name]
        self.torch_unet = tiny.torch_unet(self.config)
        self.unet = unet_config.ip_unet_from_config(self.config)
        self.abstract = unet_config.abstract_ip_unet_params(self.unet)
        base_state = {k: v.numpy() for k, v in self.torch_unet.state_dict().items()}
        self.frozen = torch_state_to_flax(base_state, split_unet_params(self.abstract)[0], source=f"torch {name} UNet")
        # Our adapters: random official-layout weights (numbered by diffusers' processor order) brought into Flax.
        loaded = {v: adapter_from_official(official_state(self, v), self.abstract) for v in KINDS}
        self.image_projs = {v: module for v, (_, module, _) in loaded.items()}
        self.adapters = {v: adapter for v, (_, _, adapter) in loaded.items()}

        rng = np.random.default_rng(0)
        cross = self.config["cross_attention_dim"]
        self.sample = rng.standard_normal((BATCH, 4, 16, 16)).astype(np.float32)
        self.timesteps = np.array([3, 700], dtype=np.int32)
        self.text = rng.standard_normal((BATCH, TEXT_TOKENS, cross)).astype(np.float32)
        self.added = {}
        if self.config.get("addition_embed_type") == "text_time":
            self.added = {
                "text_embeds": rng.standard_normal((BATCH, tiny.SDXL_TEXT_EMBEDS_DIM)).astype(np.float32),
                "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (BATCH, 1)),
            }
        hidden = rng.standard_normal((BATCH, 1, tiny.PLUS_TOKENS, tiny.PLUS_HIDDEN)).astype(np.float32)
        self.embeds = {"base": rng.standard_normal((BATCH, 1, CLIP_DIM)).astype(np.float32), "plus": hidden}
        # Full makes one token per hidden state: NUM_TOKENS of them, so every kind shares one compiled UNet.
        self.embeds["full"] = hidden[:, :, :NUM_TOKENS]
        self._predict = jax.jit(
            lambda params, ip_scale, tokens: (
                self.unet.apply(
                    {"params": params, "ip_scale": ip_scale},
                    jnp.asarray(self.sample),
                    jnp.asarray(self.timesteps),
                    jnp.asarray(self.text),
                    added_cond_kwargs={k: jnp.asarray(v) for k, v in self.added.items()} or None,
                    image_tokens=tokens,
                ).sample
            )
        )

    def flax_predict(self, kind: str, adapter: dict | None = None) -> np.ndarray:
        """Our image projection + IP-UNet at scale SCALE (`adapter` defaults to our adapter of `kind`)."""
        adapter = self.adapters[kind] if adapter is None else adapter
        tokens = self.image_projs[kind].apply({"params": adapter["image_proj"]}, jnp.asarray(self.embeds[kind]))
        params = merge_unet_params(self.frozen, adapter["ip_layers"])
        return np.asarray(self._predict(params, ip_scale_tree(params, SCALE), tokens))

    def torch_pipeline(self):
        """A real diffusers pipeline from tiny random components around a fresh copy of the pristine UNet."""
        return tiny.torch_pipeline(copy.deepcopy(self.torch_unet), sdxl=self.name == "sdxl")

    def torch_predict(self, pipe, kind: str, scale: float = SCALE) -> np.ndarray:
        """The pipeline's UNet with its loaded IP-Adapter at `scale`, set through the pipeline."""
        pipe.set_ip_adapter_scale(scale)
        added = {"image_embeds": [torch.from_numpy(self.embeds[kind])]}
        added.update({k: torch.from_numpy(v) for k, v in self.added.items()})
        with torch.no_grad():
            out = pipe.unet(
                torch.from_numpy(self.sample),
                torch.from_numpy(self.timesteps).long(),
                torch.from_numpy(self.text),
                added_cond_kwargs=added,
            ).sample
        return out.numpy()


class Models(dict):
    """Each tiny config's `Model`, built on first use and kept for the whole module."""

    def __missing__(self, name: str) -> Model:
        self[name] = Model(name)
        return self[name]


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> None:
    """max |actual - expected| <= rtol * max |expected|."""
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"max abs diff {err:.2e} x max|expected| > {rtol}"


def load_in_diffusers(model: Model, path: Path):
    pipe = model.torch_pipeline()
    pipe.load_ip_adapter(
        str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None, local_files_only=True
    )
    return pipe


def official_file(tmp_path: Path, state: dict, file_format: str, name: str = "ip-adapter") -> Path:
    """An official-layout file written by the reference tools (safetensors' numpy API / torch.save), not by us."""
    path = tmp_path / f"{name}{SUFFIX[file_format]}"
    if file_format == "safetensors":
        safetensors.numpy.save_file({f"{s}.{k}": v for s, part in state.items() for k, v in part.items()}, path)
    else:
        torch.save({s: {k: _to_torch(v) for k, v in part.items()} for s, part in state.items()}, path)
    return path


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def official_state(model: Model, kind: str = "base") -> dict:
    """A random official-layout adapter, numbered by diffusers' attention processor order
    (`ipadapter_jax.testing.tiny.random_official_adapter`); Full gets a random MLP projection."""
    if kind != "full":
        return tiny.random_official_adapter(model.torch_unet, clip_dim=CLIP_DIM, num_tokens=NUM_TOKENS, kind=kind)
    state = tiny.random_official_adapter(model.torch_unet, clip_dim=CLIP_DIM, num_tokens=NUM_TOKENS)
    cross = model.config["cross_attention_dim"]
    spec = ImageProjSpec("full", CLIP_TOKENS, dict(cross_attention_dim=cross, clip_embeddings_dim=tiny.PLUS_HIDDEN))
    image_proj = flax_to_official(numpy_init(param_shapes(build_image_proj(spec)), seed=3))
    rng = np.random.default_rng(4)
    # numpy_init leaves norms at identity and biases at 0; move every 1-d param so none is trivial.
    state["image_proj"] = {
        k: (v + rng.standard_normal(v.shape) * 0.1).astype(np.float32) if v.ndim == 1 else v
        for k, v in image_proj.items()
    }
    return state
