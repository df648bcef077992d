"""The evaluation CLIP model (transformers' Flax `CLIPModule`, loaded from PyTorch weights) and the paper's metrics.

Loading: a folder as `CLIPModel.save_pretrained` writes it (`config.json`, the weights, and the tokenizer files of
the matching `CLIPProcessor`/`CLIPTokenizer`), e.g. `openai/clip-vit-large-patch14`. The param tree's shapes
come from `jax.eval_shape` of the module's init (no random init runs); the state dict is read tensor by tensor
(`ipadapter_jax.weights.weight_files`) and converted with `ipadapter_jax.weights.torch_layout`, as
`ipadapter_jax.weights.clip_image_encoder` does for the image encoder.

Metrics (all in float32; embeddings are CLIP's projected features, `get_image_features` /
`get_text_features`, L2-normalised before the dot product):

  CLIP-I(generated, prompt image) = cos(E_img(generated), E_img(prompt image))
  CLIP-T(generated, caption)      = cos(E_img(generated), E_txt(caption))          (raw cosine, in [-1, 1])
  CLIP-T x100                     = 100 * CLIP-T
  CLIPScore (Hessel et al. 2021)  = 2.5 * max(CLIP-T, 0)

Images go through `ipadapter_jax.models.clip_preprocessing.preprocess` (exactly `CLIPImageProcessor` at 224 px);
captions through the folder's tokenizer, truncated to the text model's context (77 tokens for OpenAI CLIP).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ipadapter_jax import quiet
from ipadapter_jax.models.clip_preprocessing import CLIP_IMAGE_SIZE, preprocess
from ipadapter_jax.models.random_init import abstract_params
from ipadapter_jax.sharding import batch_sharding, local_mesh, replicated
from ipadapter_jax.weights.torch_layout import ConversionError, torch_key_to_flax_module_path, torch_state_to_flax
from ipadapter_jax.weights.weight_files import open_state_dict

quiet.install()

from transformers import CLIPConfig, CLIPTokenizer  # noqa: E402  (after the log filter)
from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule  # noqa: E402

CLIPSCORE_WEIGHT = 2.5  # Hessel et al.'s w


@dataclasses.dataclass(frozen=True)
class EvalCLIP:
    """A full CLIP model (vision + text + both projections) for scoring.

    module: transformers' bare `FlaxCLIPModule` (pixel input NHWC); params: its param tree, paths as
    `FlaxCLIPModel.params` (`vision_model/encoder/layers/0/...`); tokenizer: the folder's `CLIPTokenizer`;
    max_length: tokens per caption (the text model's context, at most the tokenizer's limit).
    """

    module: Any
    params: dict
    tokenizer: Any
    max_length: int


def load_eval_clip(folder: str | Path, *, dtype: Any = jnp.float32) -> EvalCLIP:
    """Loads a `CLIPModel.save_pretrained` folder (safetensors or `.bin`, single or sharded) and its tokenizer.

    Raises:
      ConversionError: the weights do not fit the config (every missing, unexpected, misshapen key named),
        the vision tower is not a 224 px model, or the tokenizer files are missing.
    """
    folder = Path(folder)
    config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    if config.vision_config.image_size != CLIP_IMAGE_SIZE:
        raise ConversionError(
            f"{folder}: the evaluation CLIP must take {CLIP_IMAGE_SIZE} px images (the paper's ViT-L/14 does), "
            f"this one takes {config.vision_config.image_size} px"
        )
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, TypeError) as err:
        raise ConversionError(
            f"{folder}: no CLIP tokenizer files (vocab.json, merges.txt): save the model's CLIPProcessor or "
            f"CLIPTokenizer into the same folder ({err})"
        ) from None
    module = FlaxCLIPModule(config, dtype=dtype)
    max_length = min(tokenizer.model_max_length, config.text_config.max_position_embeddings)
    example_ids = np.zeros((1, max_length), np.int32)
    example_pixels = np.zeros((1, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, config.vision_config.num_channels), np.float32)
    abstract = abstract_params(module, example_ids, example_pixels, np.ones_like(example_ids), example_ids)
    target = traverse_util.flatten_dict(abstract)
    state = open_state_dict(folder)
    # position_ids are buffers older transformers saved with the weights; Flax recomputes them.
    state = state.without(key for key in state if key.endswith("embeddings.position_ids"))
    # torch_layout joins a list index to its parent (`layers_0`); transformers' Flax CLIP keeps it as a level
    # of its own (`layers/0`): convert against the joined form of the target, then split the paths back.
    joined = {_join_indices(path): leaf for path, leaf in target.items()}
    flat = traverse_util.flatten_dict(
        torch_state_to_flax(state, traverse_util.unflatten_dict(joined), source=str(state.source), dtype=np.float32)
    )
    params = traverse_util.unflatten_dict({path: flat[_join_indices(path)] for path in target})
    return EvalCLIP(module=module, params=params, tokenizer=tokenizer, max_length=max_length)


class CLIPScorer:
    """Batched, device-sharded CLIP embeddings: inputs are cut into fixed-size batches (the last one padded), so
    each tower compiles once; the batch axis is split over the local devices, the params replicated.

    batch_size: rows per compiled call; rounded up to a multiple of the device count.
    """

    def __init__(self, model: EvalCLIP, batch_size: int = 32, devices: Sequence[jax.Device] | None = None):
        self.model = model
        self.mesh = local_mesh(list(devices) if devices is not None else None)
        self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
        self.params = jax.device_put(model.params, replicated(self.mesh))
        module = model.module

        def image_features(params: Any, pixels: jax.Array) -> jax.Array:  # (B, 224, 224, 3) -> (B, D)
            return module.apply(
                {"params": params}, pixels, method=lambda m, x: m.visual_projection(m.vision_model(x)[1])
            )

        def text_features(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:  # (B, T) -> (B, D)
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
            return module.apply(
                {"params": params},
                ids,
                mask,
                positions,
                method=lambda m, i, a, p: m.text_projection(m.text_model(i, a, p)[1]),
            )

        self._image_features = jax.jit(image_features)
        self._text_features = jax.jit(text_features)

    def image_embeddings(self, images: Sequence[Any]) -> np.ndarray:
        """PIL images or uint8 arrays (any size/mode) -> (N, projection_dim) float32 (not normalised)."""
        if not images:
            return np.zeros((0, self.model.module.config.projection_dim), np.float32)
        return self._batched(self._image_features, preprocess(list(images)))

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> (N, projection_dim) float32 (not normalised); each truncated to `max_length` tokens."""
        if not texts:
            return np.zeros((0, self.model.module.config.projection_dim), np.float32)
        tokens = self.model.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.model.max_length, return_tensors="np"
        )
        return self._batched(
            self._text_features, tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)
        )

    def _batched(self, fn: Any, *arrays: np.ndarray) -> np.ndarray:
        """Runs `fn(params, *batch)` over fixed-size batches of the row-aligned `arrays`; -> (N, D)."""
        count, out = len(arrays[0]), []
        sharding = batch_sharding(self.mesh)
        for start in range(0, count, self.batch_size):
            chunk = [a[start : start + self.batch_size] for a in arrays]
            rows = len(chunk[0])
            # Pad by repeating the last row: one compiled shape, and no all-zero rows that could produce NaNs.
            chunk = [np.concatenate([c, np.repeat(c[-1:], self.batch_size - rows, axis=0)]) for c in chunk]
            # Full float32 matmuls also on TPU/GPU (whose default is bf16 passes): scores must not depend on the
            # accelerator; the scoring cost is small next to generation.
            with jax.default_matmul_precision("highest"):
                result = fn(self.params, *jax.device_put(chunk, sharding))
            out.append(np.asarray(result, np.float32)[:rows])
        return np.concatenate(out)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) and (N, D) (or (1, D), broadcast) embeddings -> (N,) float32."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1).astype(np.float32)


def clipscore(clip_t: np.ndarray, weight: float = CLIPSCORE_WEIGHT) -> np.ndarray:
    """Hessel et al.'s CLIPScore from raw image-text cosines: `weight * max(cos, 0)`."""
    return weight * np.maximum(np.asarray(clip_t, np.float32), 0.0)


def _join_indices(path: tuple[str, ...]) -> tuple[str, ...]:
    # ('text_model', 'encoder', 'layers', '0', 'mlp', 'fc1', 'kernel') -> (..., 'layers_0', 'mlp', 'fc1', 'kernel')
    return torch_key_to_flax_module_path(".".join(path[:-1])) + path[-1:]
