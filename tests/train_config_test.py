"""The training config: every preset validates; every bad value is one ConfigError naming the field, raised
before anything is loaded; the `train` command turns it into one `error:` line and exit status 2."""

from __future__ import annotations

import time

import pytest

from ipadapter_jax.cli import train as train_cli
from ipadapter_jax.cli.main import EXIT_USAGE
from ipadapter_jax.presets import PRESETS, get_preset
from ipadapter_jax.training.config import ConfigError, TrainConfig


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(name):
    config = TrainConfig.from_config_dict(get_preset(name))
    assert config.total_steps >= 1 and config.data.batch_size_per_device >= 1


def test_loading_models_needs_a_base_and_an_image_encoder():
    """The sd15 preset leaves the folders to the command line: loading says which flag to give."""
    config = TrainConfig.from_config_dict(get_preset("sd15"))
    with pytest.raises(ConfigError, match=r"model.base is empty: .*--config.model.base="):
        config.model.require_models()


def test_presets_override_the_default():
    default, demo, plus = (TrainConfig.from_config_dict(get_preset(n)) for n in ("sd15", "demo", "sd15_plus"))
    assert (default.optim.lr, default.data.drop_rates, default.data.resolution) == (1e-4, (0.05, 0.05, 0.05), 512)
    assert (demo.optim.lr, demo.data.drop_rates, demo.model.base) == (1e-3, (0.05, 0.85, 0.05), "tiny")
    assert (plus.model.adapter_kind, plus.model.num_tokens) == ("plus", 16)
    assert (default.data.crop, TrainConfig.from_config_dict(get_preset("sdxl")).data.crop) == ("center", "center_floor")


BAD = [
    ("optim.lr", -1.0, "optim.lr must be > 0"),
    ("optim.lr", 0.0, "optim.lr must be > 0"),
    ("optim.lr", float("nan"), "optim.lr must be a finite number"),
    ("total_steps", 0, "total_steps must be >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints must be >= 1"),
    ("checkpoint_every", 0, "checkpoint_every must be >= 1"),
    ("optim.grad_accum_steps", 0, "optim.grad_accum_steps must be >= 1"),
    ("data.drop_rates", (0.5, 0.4, 0.2), "sum to 1.1; at most 1"),
    ("data.drop_rates", (0.5, -0.1, 0.0), "data.drop_rates must be in [0.0, 1.0]"),
    ("loss.snr_gamma", -1.0, "loss.snr_gamma must be >= 0.0"),
    ("on_nonfinite", "ignore", "on_nonfinite must be one of 'stop', 'skip'"),
    ("data.resolution", 100, "data.resolution must be a multiple of 8"),
    ("data.crop", "centre", "data.crop must be one of"),
    ("model.adapter_kind", "faceid-plusv2", "model.adapter_kind must be one of"),
    ("model.face_embed_dim", 0, "model.face_embed_dim must be >= 1"),
    ("model.faceid_shortcut_scale", -1.0, "model.faceid_shortcut_scale must be >= 0.0"),
    ("model.attention_implementation", "flash", "model.attention_implementation must be one of"),
    ("mesh.fsdp", 0, "mesh.fsdp must be >= 1"),
    ("ema_decay", 1.0, "ema_decay must be in [0.0, 1.0)"),
    ("profile_steps", (5, 3), "profile_steps must be () or (first, last)"),
    ("sharding_rules", (("(", "fsdp"),), "invalid regex"),
    ("total_steps", 1.5, "total_steps must be an integer"),
]


@pytest.mark.parametrize("field, value, message", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_a_bad_value_is_one_error_naming_the_field(field, value, message):
    config = get_preset("tiny").to_dict()
    node = config
    *parents, leaf = field.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TrainConfig.from_config_dict(config)


def test_an_unknown_field_is_an_error():
    config = get_preset("tiny").to_dict()
    config["optim"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match="unknown config field.*optim.learning_rate"):
        TrainConfig.from_config_dict(config)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config.optim.lr=-1"], "optim.lr must be > 0"),
        (["--config.total_steps=0"], "total_steps must be >= 1"),
        (["--config.data.drop_rates=(0.6,0.6,0.0)"], "sum to 1.2"),
        (["--config.optim.nosuch=1"], "a --config.* override names a field the config does not have"),
        (["--config=nosuch"], "--config nosuch: neither a preset"),
    ],
)
def test_the_train_command_reports_it_in_one_line_before_any_work(tmp_path, capsys, argv, message):
    start = time.perf_counter()
    status = train_cli.main([f"--workdir={tmp_path / 'run'}", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USAGE
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "run").exists()  # nothing was created, loaded or compiled
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("pytorch_numerics", [True, False])
def test_the_numerics_option_reaches_the_unet_of_the_step_and_of_sampling(pytorch_numerics):
    """`model.pytorch_numerics` (training) and `load_base(pytorch_numerics=)` (sampling) set the UNet's option;
    what the option computes is tested against PyTorch in unet_parity_test."""
    from ipadapter_jax.training.components import step_models
    from ipadapter_jax.weights import load_base

    config = get_preset("tiny")
    config.model.pytorch_numerics = pytorch_numerics
    model = TrainConfig.from_config_dict(config).model
    base = load_base("tiny", pytorch_numerics=pytorch_numerics, progress=False)
    assert step_models(model, base.unet.clone(pytorch_numerics=not pytorch_numerics), None).unet.pytorch_numerics is (
        pytorch_numerics
    )
    assert base.unet.pytorch_numerics is pytorch_numerics
