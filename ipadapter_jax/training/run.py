"""Building a training run: everything the loop needs, placed on the mesh and compiled, before the first step.

`build_run(config, workdir)` reads top to bottom: the workdir's checkpoints (one past `total_steps` is a
ConfigError, before anything loads) -> mesh -> components -> data -> optimizer and step -> shardings from the
config's rules -> frozen params placed -> state restored from the latest checkpoint or created already sharded
(`jit(init, out_shardings=...)`) -> the step compiled ahead of time with explicit shardings and a donated state.
The loop (`ipadapter_jax.training.loop`) then only steps and calls hooks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from ipadapter_jax import paths, sharding
from ipadapter_jax.data import loader
from ipadapter_jax.training import checkpoint, components
from ipadapter_jax.training.config import ConfigError, TrainConfig
from ipadapter_jax.training.encode import IMAGE_FEATURES, encode_batch, encode_if_raw, null_conditions
from ipadapter_jax.training.loop_costs import program_costs
from ipadapter_jax.training.program import step_program
from ipadapter_jax.training.step import diffusion_loss


@dataclasses.dataclass
class Run:
    """A training run ready to step. `state` is replaced after every step (its buffers are donated)."""

    config: TrainConfig
    workdir: str
    mesh: Mesh
    comps: components.Components
    batches: loader.DataIterator
    frozen: dict  # placed on the mesh; what the step reads but never trains
    state: Any  # TrainState, placed on the mesh
    step: Callable[[Any, dict, dict], tuple[Any, dict]]  # compiled: (state, frozen, batch) -> (state, metrics)
    step_flops: float  # of the whole (global) step: XLA's per-device count (loops once per trip) x devices; 0: unknown
    checkpoints: ocp.CheckpointManager
    held_out_loss: Callable[[Any], float] | None  # adapter -> loss of the held-out batch, fixed noise

    @property
    def first_step(self) -> int:
        return int(self.state.step)

    @property
    def global_batch(self) -> int:
        return self.batches.global_batch_size

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def build_run(config: TrainConfig, workdir: str, log: Callable[[str], None] = print) -> Run:
    """Builds (or resumes) the run of `config` in `workdir` (created)."""
    if not config.data.path:
        raise ConfigError("data.path is empty: give a built dataset or an embedding cache (`--config.data.path=...`)")
    paths.makedirs(workdir)
    ckpt = checkpoint.manager(workdir, config.keep_checkpoints)
    if (latest := ckpt.latest_step()) is not None and latest > config.total_steps:
        raise ConfigError(
            f"{ckpt.directory} holds a checkpoint of step {latest}, past total_steps="
            f"{config.total_steps}: this run would train nothing. Raise total_steps to resume it, or give a new workdir"
        )
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    comps = components.load(config, workdir)

    # Data: raw examples are encoded inside the step; an embedding cache already holds the encodings.
    preprocessor = comps.preprocessor(config.data.resolution, config.data.crop)
    data = loader.open_dataset(config.data.path, preprocessor)
    _check_cache_settings(data, config)
    _check_adapter_inputs(data, config.data.path, config, comps)
    global_batch = config.data.batch_size_per_device * jax.device_count()
    batches = loader.DataIterator(
        data,
        global_batch_size=global_batch,
        seed=config.data.shuffle_seed(config.seed),
        drop_rates=config.data.drop_rates,
        sharding=sharding.batch_sharding(mesh),
        worker_count=config.data.num_workers,
    )
    frozen = dict(comps.frozen, **null_encodings(comps, data))
    if data.cached:
        del frozen["encoders"]

    program = step_program(config, comps, frozen, data.cached, mesh)
    frozen = sharding.place(frozen, program.shardings["frozen"])
    comps.frozen = {}  # the placed copies are the ones used from here on: free the host ones (SD1.5 UNet: 3.4 GB)

    if latest is not None:
        state, data_state, step = checkpoint.restore(ckpt, program.state_target())
        batches.set_state(data_state)
        log(f"resumed from step {step} in {workdir}")
    else:
        state = program.create_state(comps.adapter)

    held_out = None
    if config.data.eval_path:
        held_out = _held_out_loss(config, comps, preprocessor, data.cached, frozen, mesh, global_batch)

    start = time.time()
    compiled = program.compile(state, frozen, batches.peek())
    step_flops = program_costs(compiled).flops * mesh.size  # one device's share times the devices
    log(f"compiled the train step in {time.time() - start:.1f}s; {step_flops / 1e9:.1f} GFLOP/step")
    return Run(config, workdir, mesh, comps, batches, frozen, state, compiled, step_flops, ckpt, held_out)


def _check_cache_settings(data: loader.Dataset, config: TrainConfig) -> None:
    """An embedding cache is encoded at one resolution and crop: training it with others is a config error."""
    if not data.cached:
        return
    settings = data.source.info["preprocessor"]
    resolution, crop = settings["resolution"], settings.get("crop", "center")  # caches before crops: center
    if resolution != config.data.resolution:
        raise ConfigError(
            f"data.resolution is {config.data.resolution} but the embedding cache {config.data.path} was "
            f"encoded at {resolution} px (its cache_info.json): set --config.data.resolution={resolution} or "
            "encode the dataset again"
        )
    if crop != config.data.crop:
        random = " (a random crop needs the built dataset: a cache holds one encoding per image)"
        raise ConfigError(
            f"data.crop is {config.data.crop!r} but the embedding cache {config.data.path} was encoded with crop "
            f"{crop!r} (its cache_info.json): set --config.data.crop={crop} or train from the built dataset"
            + (random if config.data.crop == "random" else "")
        )


def _check_adapter_inputs(data: loader.Dataset, path: str, config: TrainConfig, comps: components.Components) -> None:
    """The data at `path` holds what the adapter's projection reads: a FaceID adapter identity embeddings of its width;
    an embedding cache the image features (a cache encoded for FaceID has none)."""
    record = data.source[0]
    if data.cached and IMAGE_FEATURES[comps.encoders.kind] is not None and "image_embeds" not in record:
        raise ConfigError(
            f"the embedding cache {path} holds no image_embeds (encoded for a FaceID adapter), but "
            f"model.adapter_kind={config.model.adapter_kind!r} reads image features: encode it with this config"
        )
    face_embed_dim = comps.face_embed_dim
    if face_embed_dim is None:
        return
    found = record.get("face_embeds")
    if found is None:
        raise ConfigError(
            f"model.adapter_kind={config.model.adapter_kind!r} trains on identity embeddings, but {path} "
            "holds none (no face_embeds): build the dataset from annotations whose entries name their .npy file "
            '("face_embeds": "faces/1.npy", see README "Train a FaceID adapter")'
        )
    if np.shape(found) != (face_embed_dim,):
        raise ConfigError(
            f"{path}: face_embeds are {np.shape(found)} per example, but the FaceID adapter reads "
            f"({face_embed_dim},): set --config.model.face_embed_dim={np.shape(found)[-1]}"
        )


def null_encodings(comps: components.Components, data: loader.Dataset) -> dict:
    """What the step substitutes for dropped conditions, each (1, ...): the encoding of the empty prompt, and the
    null image input of the adapter's kind (`null_projection_input`)."""
    null = {k: np.asarray(v)[None] for k, v in data.null_example.items()}
    if not data.cached:
        null = jax.device_get(jax.jit(lambda p, b: encode_batch(comps.encoders, p, b))(comps.frozen["encoders"], null))
    return jax.tree.map(np.asarray, null_conditions(comps.encoders.kind, null))


def _held_out_loss(
    config: TrainConfig,
    comps: components.Components,
    preprocessor: Any,
    cached: bool,
    frozen: dict,
    mesh: Mesh,
    global_batch: int,
) -> Callable[[Any], float]:
    """adapter -> the diffusion loss of the held-out set's first global batch (in order, no condition drops) with a
    fixed key: the same noise and timesteps at every evaluation, so the curve has no sampling noise."""
    eval_data = loader.open_dataset(config.data.eval_path, preprocessor)
    if eval_data.cached != cached:
        raise ValueError("data.eval_path must be in the same form (raw or embedding cache) as data.path")
    _check_adapter_inputs(eval_data, config.data.eval_path, config, comps)
    eval_batches = loader.DataIterator(
        eval_data,
        global_batch_size=global_batch,
        seed=config.data.shuffle_seed(config.seed),
        shuffle=False,
        drop_rates=(0.0, 0.0, 0.0),
        sharding=sharding.batch_sharding(mesh),
    )
    batch = next(eval_batches)
    eval_batches.close()
    encoders, loss_config = comps.encoders, config.loss_config()

    @jax.jit
    def loss(adapter: Any, frozen: dict, batch: dict) -> jax.Array:
        encoded = encode_if_raw(encoders, frozen.get("encoders"), batch)
        return diffusion_loss(adapter, frozen, encoded, jax.random.PRNGKey(0), comps.models, loss_config)[0]

    def held_out_loss(adapter: Any) -> float:
        with jax.set_mesh(mesh):  # traced under the mesh, as the step (see `StepProgram.compile`)
            return float(loss(adapter, frozen, batch))

    return held_out_loss
