"""Training a FaceID adapter end to end: `ipadapter-jax train` on a tiny dataset whose annotations name identity
embeddings, from a diffusers SD1.5-layout folder; the exported official `.safetensors` loads in diffusers'
`load_ip_adapter` (no LoRA keys: diffusers loads the LoRA only when the file has one), and its projection and K'/V'
there are the trained ones. Plus the config's refusals (before compiling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from ipadapter_jax.cli.train import main as train_main
from ipadapter_jax.presets import get_preset
from ipadapter_jax.testing import tiny_folders
from ipadapter_jax.testing import training_runs as runs
from ipadapter_jax.training.config import ConfigError, TrainConfig
from ipadapter_jax.weights import load_adapter, load_base
from ipadapter_jax.weights.official_layout import ip_layers_to_official

ID_DIM = 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faceid_train")
    base = root / "sd15"
    torch_pipe = tiny_folders.sd15_pipeline(base)
    encoder = root / "image_encoder"  # loaded by training's components; FaceID reads no image features
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=16, projection_dim=24)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(encoder)
    dataset, embeds = runs.build_face_dataset(root / "faces", num_images=4, seed=0, dim=ID_DIM)
    return dict(root=root, base=base, encoder=encoder, torch_pipe=torch_pipe, dataset=dataset, embeds=embeds)


def _flags(folders: dict, dataset: str, **extra) -> list[str]:
    model = {"model.base": folders["base"], "model.image_encoder": folders["encoder"], "model.adapter_kind": "faceid",
             "model.face_embed_dim": ID_DIM, "data.resolution": 16, "tensorboard": False}  # fmt: skip
    return ["--config=tiny", *runs.overrides(dataset, 2, 2, **{**model, **extra})]


@pytest.mark.slow
@pytest.mark.parity
def test_train_exports_a_file_diffusers_loads(folders, tmp_path):
    workdir = tmp_path / "run"
    assert train_main([f"--workdir={workdir}", *_flags(folders, folders["dataset"])]) == 0
    exported = workdir / "ip-adapter.safetensors"
    ours = load_adapter(exported, load_base(folders["base"], progress=False))
    assert ours.kind == "faceid" and "unet_lora" not in ours.params

    pipe = folders["torch_pipe"]
    pipe.load_ip_adapter(str(workdir), subfolder="", weight_name=exported.name, image_encoder_folder=None)
    faces = folders["embeds"][:3]
    with torch.no_grad():
        theirs = pipe.unet.encoder_hid_proj.image_projection_layers[0](torch.from_numpy(faces)).numpy()
    tokens = np.asarray(ours.image_proj.apply({"params": ours.params["image_proj"]}, faces))
    assert tokens.shape == theirs.shape == (3, 4, pipe.unet.config.cross_attention_dim)
    assert np.abs(tokens - theirs).max() <= 1e-5 * np.abs(theirs).max()
    processors = list(pipe.unet.attn_processors.values())
    for key, value in ip_layers_to_official(ours.params["ip_layers"]).items():
        layer_id, name = key.split(".", 1)
        loaded = getattr(processors[int(layer_id)], name[: -len(".weight")])[0].weight.detach().numpy()
        np.testing.assert_array_equal(loaded, value)
    # K'/V' started as the base's to_k/to_v (the paper's init): two AdamW steps of lr 1e-4 moved them.
    to_k = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.detach().numpy()
    assert 0 < np.abs(processors[1].to_k_ip[0].weight.detach().numpy() - to_k).max() < 1e-3


def test_faceid_on_data_without_face_embeds_is_one_config_error(folders, tmp_path, capsys):
    dataset = runs.build_dataset(tmp_path / "plain", num_images=2, seed=1)
    assert train_main([f"--workdir={tmp_path / 'run'}", *_flags(folders, dataset)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: the one error line
    assert error.startswith("error: model.adapter_kind='faceid' trains on identity embeddings, but")
    assert "holds none (no face_embeds)" in error

    wrong_width = _flags(folders, folders["dataset"], **{"model.face_embed_dim": ID_DIM + 1})
    assert train_main([f"--workdir={tmp_path / 'run2'}", *wrong_width]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"face_embeds are ({ID_DIM},) per example, but the FaceID adapter reads ({ID_DIM + 1},)" in error


def test_faceid_config_refusals():
    config = get_preset("tiny")
    config.model.adapter_kind = "faceid"
    config.samples.every = 10
    with pytest.raises(ConfigError, match="samples.every: the sample grids prompt the adapter with images"):
        TrainConfig.from_config_dict(config)
    config = get_preset("tiny")
    config.model.faceid_shortcut_scale = 0.5
    with pytest.raises(ConfigError, match="needs model.adapter_kind='faceid-plus', got 'base'"):
        TrainConfig.from_config_dict(config)
