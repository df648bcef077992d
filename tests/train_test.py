"""The training script end to end on the tiny preset: sharding is invisible, multi-host equals one host,
preemption + resume equals an uninterrupted run, and the loss of a held-out batch falls.

Runs on a procedural dataset built through the real `data build` path. Multi-device runs use
`--xla_force_host_platform_device_count` in subprocesses (JAX fixes the device count at start-up).
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from ipadapter_jax.cli import cache as cache_encodings_cli
from ipadapter_jax.cli.main import EXIT_PREEMPTED
from ipadapter_jax.testing import tiny, tiny_folders
from ipadapter_jax.testing import training_runs as runs
from ipadapter_jax.training import components
from ipadapter_jax.training.config import TrainConfig
from ipadapter_jax.training.loop import train
from ipadapter_jax.weights import tiny_base
from ipadapter_jax.weights.torch_layout import torch_key_to_flax_module_path

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 4
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return runs.build_dataset(tmp_path_factory.mktemp("data"), num_images=24, seed=0)


@pytest.fixture(scope="module")
def single_device_workdir(dataset, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("one_device"))
    train(runs.config(dataset, STEPS, GLOBAL_BATCH), workdir)
    return workdir


@pytest.fixture(scope="module")
def single_device_run(single_device_workdir) -> dict:
    return runs.final_state(single_device_workdir)


def test_sharding_is_invisible(dataset, single_device_run, single_device_workdir, tmp_path):
    """(data=8), (data=4, fsdp=2), (data=2, fsdp=4) on 8 devices == 1 device, same global batch; and the FLOPs per
    step in metrics.jsonl (TFLOP/s and MFU) are the whole step's, not one device's share."""
    procs = {}
    for data, fsdp in ((8, 1), (4, 2), (2, 4)):
        args = runs.overrides(dataset, STEPS, GLOBAL_BATCH // 8, **{"mesh.data": data, "mesh.fsdp": fsdp})
        workdir = str(tmp_path / f"mesh_{data}x{fsdp}")
        procs[workdir] = runs.train_subprocess(workdir, args, devices=8)
        # One at a time: two CPU cores cannot run three compiles in parallel any faster.
        out, _ = procs[workdir].communicate(timeout=600)
        assert procs[workdir].returncode == 0, out
    flops = runs.step_flops(single_device_workdir)
    for workdir in procs:
        runs.assert_states_close(runs.final_state(workdir), single_device_run)
        assert runs.step_flops(workdir) == pytest.approx(flops, rel=0.05), workdir


def test_training_on_the_embedding_cache_equals_raw(dataset, single_device_run, tmp_path):
    """`ipadapter-jax cache` then training on the cache == training on raw data (encoders run in the step)."""
    cache = str(tmp_path / "cache")
    assert cache_encodings_cli.main([f"--raw={dataset}", f"--out={cache}", "--batch_size=8"]) == 0
    workdir = str(tmp_path / "cached_run")
    train(runs.config(cache, STEPS, GLOBAL_BATCH), workdir)
    runs.assert_states_close(runs.final_state(workdir), single_device_run)


def test_trains_from_diffusers_model_folders(dataset, tmp_path):
    """A real base: a diffusers SD1.5-layout folder and a CLIP image encoder folder, both from PyTorch weights.
    The adapter starts as the paper says (K'/V' = the folder's to_k/to_v) and training runs and exports."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    base = tmp_path / "sd15"
    torch_pipe = tiny_folders.sd15_pipeline(base)
    encoder = tmp_path / "image_encoder"
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=32,
            projection_dim=24,
        )
    ).save_pretrained(encoder)
    config = runs.config(
        dataset,
        2,
        per_device=2,
        **{
            "model.base": str(base),
            "model.image_encoder": str(encoder),
            "data.resolution": 16,
        },
    )
    workdir = str(tmp_path / "run")
    comps = components.load(TrainConfig.from_config_dict(config), workdir)
    for name, module in torch_pipe.unet.named_modules():
        if name.endswith("attn2"):
            layer = comps.adapter["ip_layers"]
            for part in torch_key_to_flax_module_path(name):
                layer = layer[part]
            np.testing.assert_array_equal(layer["to_k_ip"]["kernel"], module.to_k.weight.detach().numpy().T)
            np.testing.assert_array_equal(layer["to_v_ip"]["kernel"], module.to_v.weight.detach().numpy().T)
    last = train(config, workdir)
    assert last["step"] == 2 and np.isfinite(last["loss"])
    assert os.path.getsize(os.path.join(workdir, "ip-adapter.safetensors")) > 0


def test_two_processes_equal_one(dataset, single_device_run, tmp_path):
    """2 processes x 4 devices (jax.distributed on localhost) == the 1-device run."""
    workdir = str(tmp_path / "multihost")
    runs.train_two_processes(workdir, runs.overrides(dataset, STEPS, GLOBAL_BATCH // 8))
    runs.assert_states_close(runs.final_state(workdir), single_device_run)


def test_sigterm_then_resume_equals_uninterrupted(dataset, single_device_run, tmp_path):
    workdir = str(tmp_path / "preempted")
    # Slow the run down with more steps than needed; SIGTERM it after its first logged step.
    proc = runs.train_subprocess(workdir, runs.overrides(dataset, 1000, GLOBAL_BATCH), devices=1)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, out  # distinct from success: a scheduler reruns the command
    assert "SIGTERM: checkpointed step" in out
    stopped_at = int(runs.final_state(workdir)["['step']"])
    assert 2 <= stopped_at < 1000
    # Resume to the same end point as an uninterrupted run (total_steps is the only difference).
    if stopped_at < STEPS:
        train(runs.config(dataset, STEPS, GLOBAL_BATCH), workdir)
        runs.assert_states_close(runs.final_state(workdir), single_device_run, rtol=0)
    else:
        # Preempted past STEPS: compare instead against an uninterrupted run to the same step.
        reference = str(tmp_path / "reference")
        train(runs.config(dataset, stopped_at + 2, GLOBAL_BATCH), reference)
        train(runs.config(dataset, stopped_at + 2, GLOBAL_BATCH), workdir)
        runs.assert_states_close(runs.final_state(workdir), runs.final_state(reference), rtol=0)


def test_loss_of_a_held_out_batch_falls(dataset, tmp_path):
    held_out = runs.build_dataset(tmp_path / "held_out", num_images=8, seed=1)
    workdir = str(tmp_path / "learn")
    config = runs.config(
        dataset, 200, per_device=8, log_every=25, eval_every=25, checkpoint_every=200, **{"optim.lr": 1e-3}
    )  # the trained tiny base: 1e-4 moves the loss only ~1% in 200 steps
    config.data.eval_path = held_out
    train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        curve = [(m["step"], m["eval_loss"]) for m in map(json.loads, f) if "eval_loss" in m]
    print("held-out loss curve:", curve)
    assert [s for s, _ in curve] == list(range(0, 201, 25))
    losses = np.array([loss for _, loss in curve])
    assert np.all(np.isfinite(losses))
    # Falls at every evaluation (same batch, same noise: no sampling noise in the curve), by > 3% overall.
    assert np.all(np.diff(losses) < 0), curve
    assert losses[-1] < 0.97 * losses[0], curve

    # The exported adapter loads in diffusers (PyTorch) with exactly the trained K'/V' weights.
    exported = os.path.join(workdir, "ip-adapter.safetensors")
    pipe = tiny.torch_pipeline(tiny.torch_unet(tiny_base.UNET))
    pipe.load_ip_adapter(
        workdir, subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None, local_files_only=True
    )
    trained = runs.final_state(workdir)
    checked = 0
    for name, processor in pipe.unet.attn_processors.items():
        if hasattr(processor, "to_k_ip"):
            path = "".join(f"['{p}']" for p in torch_key_to_flax_module_path(name[: -len(".processor")]))
            for kind in ("to_k_ip", "to_v_ip"):
                ours = trained[f"['adapter']['ip_layers']{path}['{kind}']['kernel']"]
                np.testing.assert_array_equal(getattr(processor, kind)[0].weight.detach().numpy().T, ours)
            checked += 1
    assert checked == sum("to_k_ip']['kernel']" in k and k.startswith("['adapter']") for k in trained) > 0
    assert os.path.getsize(exported) > 0
