"""Train an IP-Adapter. The same script runs on one CPU and on a multi-host TPU pod.

    ipadapter-jax train --config training/config.py:tiny --workdir out/tiny --config.data.path=DATA
    ipadapter-jax train --config training/config.py:sd15 --workdir gs://... --config.model.base=... (pod: on
      every host, with --multihost)

Reads top to bottom: devices and mesh -> components -> data -> optimizer and step -> placement on the mesh
-> resume -> compile once -> loop (log, checkpoint, export) -> final checkpoint and export.
A run restarted with the same workdir resumes from its latest checkpoint: same params, optimizer state and
data order as if never interrupted. SIGTERM (preemption) saves a checkpoint and exits cleanly. The adapter is
exported in the official layout every `export_every` steps (workdir/exports/) and at the end
(workdir/ip-adapter.safetensors).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from jax.experimental import multihost_utils

import ipadapter_jax  # noqa: F401  (log filter before any Flax model import)
from conversion.ip_adapter_files import save_ip_adapter
from training import checkpoint, components, data_loader, sharding
from training.encode import encode_batch
from training.step import (
    LossConfig,
    diffusion_loss,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
)

# Peak dense bf16 FLOP/s per chip, for MFU (REFERENCE.md s.4). Unknown devices (CPUs) report no MFU.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def null_encodings(comps: components.Components, data: data_loader.Dataset, variant: str) -> dict:
    """What the step substitutes for dropped conditions, each (1, ...): the encoding of the empty prompt, and
    zeros (base: the projection of zero embeddings) or the encoder's output on zero pixels (Plus/Full)."""
    null = {k: np.asarray(v)[None] for k, v in data.null_example.items()}
    if not data.cached:
        null = jax.device_get(jax.jit(lambda p, b: encode_batch(comps.encoders, p, b))(comps.frozen["encoders"], null))
    out = {"null_text_embeds": null["text_embeds"]}
    if "text_pooled" in null:
        out["null_text_pooled"] = null["text_pooled"]
    image = null["image_embeds"]
    out["null_image_embeds"] = np.zeros_like(image) if variant == "base" else image
    return out


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training in `workdir`; returns the last logged metrics."""
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)

    # Components: modules, frozen params, the initial adapter (host numpy).
    comps = components.load(config, workdir)

    # Data: raw examples are encoded inside the step; an embedding cache already holds the encodings.
    preprocessor = comps.preprocessor(config.data.resolution)
    data = data_loader.open_dataset(config.data.path, preprocessor)
    global_batch = config.data.batch_size_per_device * jax.device_count()
    batches = data_loader.DataIterator(
        data,
        global_batch_size=global_batch,
        seed=config.seed,
        drop_rates=tuple(config.data.drop_rates),
        sharding=sharding.batch_sharding(mesh),
        worker_count=config.data.num_workers,
    )
    frozen = dict(comps.frozen, **null_encodings(comps, data, config.model.variant))
    if data.cached:
        del frozen["encoders"]

    # Optimizer and the (pure) step function.
    schedule = learning_rate_schedule(config.optim.lr, config.optim.warmup_steps)
    optimizer = make_optimizer(
        schedule,
        weight_decay=config.optim.weight_decay,
        b1=config.optim.b1,
        b2=config.optim.b2,
        eps=config.optim.eps,
        grad_clip_norm=config.optim.grad_clip_norm,
        grad_accum_steps=config.optim.grad_accum_steps,
    )
    loss_config = LossConfig(config.model.prediction_type, config.loss.noise_offset, config.loss.snr_gamma)
    train_step = make_train_step(
        comps.models,
        optimizer,
        schedule,
        loss_config,
        ema_decay=config.ema_decay,
        grad_accum_steps=config.optim.grad_accum_steps,
        encoders=None if data.cached else comps.encoders,
    )

    # Placement: adapter + optimizer state by the sharding rules, frozen params likewise (FSDP if asked).
    def initial_state():
        return init_train_state(comps.adapter, optimizer, config.seed, config.ema_decay)

    abstract_state = jax.eval_shape(initial_state)
    min_size = config.mesh.fsdp_min_size
    state_rules = sharding.fsdp_rules(config.mesh.fsdp > 1)
    state_shardings = sharding.named_shardings(abstract_state, mesh, state_rules, min_size)
    frozen_shardings = sharding.named_shardings(frozen, mesh, sharding.fsdp_rules(config.mesh.shard_frozen), min_size)
    frozen = sharding.place(frozen, frozen_shardings)
    comps.frozen = {}  # the placed copies are the ones used from here on: free the host ones (SD1.5 UNet: 3.4 GB)

    # Resume from the latest checkpoint of this workdir, if any.
    ckpt = checkpoint.manager(workdir, config.keep_checkpoints)
    if ckpt.latest_step() is not None:
        target = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract_state, state_shardings
        )
        state, data_state, step = checkpoint.restore(ckpt, target)
        batches.set_state(data_state)
        _log(is_main, f"resumed from step {step} in {workdir}")
    else:
        state = sharding.place(jax.device_get(initial_state()), state_shardings)

    # Held-out loss: the first batch of the eval set (in order, no condition drops), fixed noise/timesteps.
    evaluate = None
    if config.data.eval_path:
        eval_data = data_loader.open_dataset(config.data.eval_path, preprocessor)
        if eval_data.cached != data.cached:
            raise ValueError("data.eval_path must be in the same form (raw or embedding cache) as data.path")
        eval_batches = data_loader.DataIterator(
            eval_data, global_batch_size=global_batch, seed=config.seed, shuffle=False, drop_rates=(0.0, 0.0, 0.0),
            sharding=sharding.batch_sharding(mesh),
        )
        eval_batch = next(eval_batches)
        eval_batches.close()
        evaluate = jax.jit(lambda adapter, frozen, batch: _held_out_loss(comps, loss_config, adapter, frozen, batch))

    # Compile once, ahead of time, with explicit shardings; the state's buffers are donated to the update.
    batch = next(batches)
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    t0 = time.time()
    compiled = jitted.lower(state, frozen, batch).compile()
    step_flops = _flops(compiled)
    _log(is_main, f"compiled the train step in {time.time() - t0:.1f}s; {step_flops / 1e9:.1f} GFLOP/step")

    # Preemption: finish the current step, checkpoint, exit.
    preempted = []
    signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

    metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a") if is_main else None
    first_step = int(state.step)

    def log_eval(step: int) -> None:
        if evaluate is not None and is_main:
            loss = float(evaluate(state.adapter, frozen, eval_batch))
            metrics_file.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")
            metrics_file.flush()

    if first_step == 0:
        log_eval(0)
    bar = tqdm.tqdm(total=config.total_steps, initial=first_step, disable=not is_main, desc="train", unit="step")
    pending: list[dict] = []
    last: dict = {}
    t_log = time.time()
    steps_since_log = 0
    step = first_step
    while step < config.total_steps:
        if config.profile_steps and step == config.profile_steps[0]:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
        state, metrics = compiled(state, frozen, batch)
        pending.append(metrics)
        step += 1
        steps_since_log += 1
        bar.update(1)
        if config.profile_steps and step == config.profile_steps[1]:
            jax.profiler.stop_trace()

        done = step >= config.total_steps or preempted
        if step % config.log_every == 0 or done:
            fetched = jax.device_get(pending)
            pending = []
            elapsed = time.time() - t_log
            last = _summarise(fetched, step, steps_since_log, elapsed, global_batch, step_flops)
            t_log, steps_since_log = time.time(), 0
            bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.1f}")
            if metrics_file:
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
            if last["nonfinite_steps"]:
                message = f"{last['nonfinite_steps']} step(s) before step {step} had a non-finite loss or gradient"
                if config.on_nonfinite == "stop":
                    # Non-finite steps leave the state untouched, so this is the last good state.
                    checkpoint.save(ckpt, step, state, batches.get_state(), force=True)
                    ckpt.wait_until_finished()
                    raise FloatingPointError(message + f"; last good state saved at step {step} in {workdir}")
                _log(is_main, message + " (skipped)")
        if step % config.eval_every == 0 or done:
            log_eval(step)
        if step % config.checkpoint_every == 0 or done:
            checkpoint.save(ckpt, step, state, batches.get_state(), force=done)
        if step % config.export_every == 0 and not done:
            export_adapter(state.adapter, config, os.path.join(workdir, "exports", f"ip-adapter_{step:08d}.safetensors"))
        if preempted:
            _log(is_main, f"SIGTERM: checkpointed step {step}, exiting")
            break
        if step < config.total_steps:
            batch = next(batches)

    ckpt.wait_until_finished()
    if step >= config.total_steps:
        final = os.path.join(workdir, "ip-adapter.safetensors")
        export_adapter(state.adapter, config, final)
        _log(is_main, f"exported {final}")
    bar.close()
    batches.close()
    if metrics_file:
        metrics_file.close()
    return last


def export_adapter(adapter: Any, config: ml_collections.ConfigDict, path: str) -> None:
    """Writes the adapter as an official `.safetensors` (diffusers' `load_ip_adapter` reads it).

    Every process takes part in gathering FSDP-split params; process 0 writes.
    """
    host_adapter = multihost_utils.process_allgather(adapter, tiled=True)
    if jax.process_index() == 0:
        metadata = {"base_model": config.model.base, "image_encoder": config.model.image_encoder}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_ip_adapter(host_adapter, path, metadata=metadata)


def _held_out_loss(
    comps: components.Components, loss_config: LossConfig, adapter: Any, frozen: dict, batch: dict
) -> jax.Array:
    """The diffusion loss of `batch` with a fixed key (same noise and timesteps at every evaluation)."""
    if "latent_mean" not in batch:  # raw examples
        flags = {"drop_image": batch["drop_image"], "drop_text": batch["drop_text"]}
        batch = dict(encode_batch(comps.encoders, frozen["encoders"], batch), **flags)
    loss, _ = diffusion_loss(adapter, frozen, batch, jax.random.PRNGKey(0), comps.models, loss_config)
    return loss


def _summarise(fetched: list[dict], step: int, steps: int, elapsed: float, global_batch: int, step_flops: float) -> dict:
    finite = [m for m in fetched if int(m["finite"])]
    summary = {
        "step": step,
        "loss": float(np.mean([m["loss"] for m in finite])) if finite else float("nan"),
        "grad_norm": float(np.mean([m["grad_norm"] for m in finite])) if finite else float("nan"),
        "param_norm": float(fetched[-1]["param_norm"]),
        "learning_rate": float(fetched[-1]["learning_rate"]),
        "nonfinite_steps": len(fetched) - len(finite),
        "steps_per_s": steps / elapsed,
        "images_per_s": steps * global_batch / elapsed,
        "tflops_per_s": steps * step_flops / elapsed / 1e12,
    }
    peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
    if peak:
        summary["mfu"] = summary["tflops_per_s"] * 1e12 / (peak * jax.device_count())
    return summary


def _flops(compiled: Any) -> float:
    """FLOPs of one step of the whole (global) computation from XLA's cost analysis (0 if unavailable)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def _log(is_main: bool, message: str) -> None:
    if is_main:
        tqdm.tqdm.write(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`ipadapter-jax train` entry point (absl flags; `--config` takes a config file and a preset)."""
    from absl import flags

    from training import cli_flags

    flag_values = flags.FlagValues()
    cli_flags.define(flag_values)
    flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, exports)", flag_values=flag_values)
    cli_flags.parse(flag_values, "train", list(sys.argv[1:] if argv is None else argv))
    if not flag_values.workdir:
        raise SystemExit("--workdir is required")
    cli_flags.initialize_distributed(flag_values)
    train(flag_values.config, flag_values.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
