"""FaceID adapters (FaceID, FaceID Plus, Plus v2's shortcut) vs diffusers' PyTorch FaceID support.

Random official-layout files for the tiny SD1.5 pipeline (`ipadapter_jax.testing.faceid_files`, written by hand:
identity MLP, FacePerceiverResampler, K'/V' and a rank-4 LoRA on every attention processor). diffusers loads them
with `load_ip_adapter` (its projection modules, and the LoRA through `load_lora_weights` at weight 1); we load them
with `load_adapter`. Tolerances: projections 1e-5 of the output's max; pipeline images the pipeline test's 5e-5 on
[0, 1] pixels (measured 2.5e-6 FaceID, 3e-6 FaceID Plus v2); without the file's LoRA diffusers' image moves by more
than 1e-2, so the LoRA is checked too.
"""

from __future__ import annotations

import copy
import json
import re
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util
from PIL import Image

from ipadapter_jax.cli.convert import main as convert_main
from ipadapter_jax.cli.generate import main as generate_main
from ipadapter_jax.models.image_proj import pack_faceid_plus_features
from ipadapter_jax.pipelines import IPAdapterPipeline
from ipadapter_jax.pipelines.faceid import faceid_prompt, with_shortcut_scale
from ipadapter_jax.testing import faceid_files, tiny
from ipadapter_jax.testing import pipeline_fixtures as tu
from ipadapter_jax.testing.adapter_files import official_file
from ipadapter_jax.weights import load_adapter, load_base, load_image_encoder
from ipadapter_jax.weights.adapter_files import save_ip_adapter
from ipadapter_jax.weights.flax_adapter_file import save_flax_adapter
from ipadapter_jax.weights.image_proj_keys import load_image_proj
from ipadapter_jax.weights.torch_layout import ConversionError, torch_key_to_flax_module_path

FACE = np.random.default_rng(7).standard_normal((1, faceid_files.ID_DIM)).astype(np.float32)
FILES = {"faceid": "ip-adapter-faceid_sd15.safetensors", "faceid-plus": "ip-adapter-faceid-plusv2_sd15.bin"}


@pytest.fixture(scope="module")
def faceid(sd15: tu.SavedPipelines) -> dict:
    """kind -> (official state, its file in the saved tiny SD1.5 pipeline's folder)."""
    out = {}
    for kind, name in FILES.items():
        state = faceid_files.random_faceid_adapter(sd15.torch_base.unet, kind)
        path = official_file(sd15.folder, state, Path(name).suffix[1:], name=Path(name).stem)
        out[kind] = (state, path)
    return out


@pytest.fixture(scope="module")
def models(sd15: tu.SavedPipelines) -> tuple:
    """Our tiny SD1.5 base and image encoder, loaded once."""
    return load_base(sd15.folder, progress=False), load_image_encoder(sd15.folder / "image_encoder")


@pytest.mark.parity
@pytest.mark.parametrize("kind, shortcut", [("faceid", None), ("faceid-plus", None), ("faceid-plus", 0.7)])
def test_projection_matches_diffusers(sd15: tu.SavedPipelines, faceid: dict, kind: str, shortcut: float | None):
    """2 examples x 2 faces; FaceID Plus reads 5 CLIP hidden states of width 40 per face."""
    state = faceid[kind][0]["image_proj"]
    rng = np.random.default_rng(0)
    ids = rng.standard_normal((2, 2, faceid_files.ID_DIM)).astype(np.float32)
    hidden = rng.standard_normal((2, 2, tiny.PLUS_TOKENS, tiny.PLUS_HIDDEN)).astype(np.float32)
    theirs_module = sd15.torch_base.unet._convert_ip_adapter_image_proj_to_diffusers(
        {k: torch.from_numpy(v) for k, v in state.items()}
    )
    spec, module, params = load_image_proj(state)
    features = ids
    if kind == "faceid-plus":
        theirs_module.clip_embeds = torch.from_numpy(hidden)
        theirs_module.shortcut, theirs_module.shortcut_scale = shortcut is not None, shortcut or 1.0
        module = module.clone(shortcut_scale=shortcut)
        features = np.asarray(pack_faceid_plus_features(ids, hidden))
    with torch.no_grad():
        theirs = theirs_module(torch.from_numpy(ids.reshape(4, -1))).numpy().reshape(2, -1, 32)
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(features)))
    assert spec.kind == kind and ours.shape == theirs.shape == (2, 2 * faceid_files.NUM_TOKENS, 32)
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()


@pytest.mark.parity
@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_official_file_round_trip(sd15: tu.SavedPipelines, faceid: dict, models, tmp_path, file_format: str):
    """Official file (.bin) -> ours -> exported (official and msgpack) -> the same tensors; diffusers loads our
    export."""
    state, path = faceid["faceid-plus"]
    base = models[0]
    adapter = load_adapter(path, base)
    exported = save_ip_adapter(adapter.params, tmp_path / f"ours.{file_format}", format=file_format)
    if file_format == "safetensors":
        flat = safetensors.numpy.load_file(str(exported))
        written = {s: {k[len(s) + 1 :]: v for k, v in flat.items() if k.startswith(f"{s}.")} for s in state}
    else:
        written = {s: {k: v.numpy() for k, v in part.items()} for s, part in torch.load(exported).items()}
    for section, part in state.items():
        assert sorted(written[section]) == sorted(part)
        for key, value in part.items():
            np.testing.assert_array_equal(written[section][key], value, err_msg=f"{section}.{key}")
    msgpack = load_adapter(save_flax_adapter(adapter.params, tmp_path / "ours.msgpack"), base)
    assert msgpack.params["unet_lora"].keys() == adapter.params["unet_lora"].keys()
    pipe = copy.deepcopy(sd15.torch_base)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=exported.name, image_encoder_folder=None)
    lora_a = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.lora_A["faceid_0"].weight
    np.testing.assert_array_equal(lora_a.detach().numpy(), state["ip_adapter"]["0.to_q_lora.down.weight"])


def run_diffusers(saved, path: Path, kind: str, shortcut: float | None, lora: bool = True, latents=None):
    """diffusers' pipeline of `saved` (the tiny SD1.5 or SDXL one) with the FaceID file at `path`, FACE at scale 0.6,
    guidance 7.5 (SD1.5's default; SDXL's is 5)."""
    pipe = copy.deepcopy(saved.torch_base)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.6)
    if not lora:
        pipe.unet.disable_adapters()
    embeds = torch.cat([torch.zeros(1, 1, faceid_files.ID_DIM), torch.from_numpy(FACE)[None]])
    if kind == "faceid-plus":
        projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        projection.clip_embeds = pipe.prepare_ip_adapter_image_embeds([tu.test_image(0)], None, "cpu", 1, True)[0]
        projection.shortcut, projection.shortcut_scale = shortcut is not None, shortcut
    with torch.no_grad():
        latents = torch.from_numpy(np.array(LATENTS if latents is None else latents))
        return pipe(prompt="the red cat", ip_adapter_image_embeds=[embeds], num_inference_steps=4, height=64,
                    width=64, latents=latents, guidance_scale=7.5, output_type="np").images  # fmt: skip


LATENTS = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("kind, shortcut", [("faceid", None), ("faceid-plus", 1.0)])
def test_pipeline_matches_diffusers(sd15, faceid: dict, models, kind: str, shortcut: float | None):
    """FaceID Plus: the v2 file's name turns the shortcut on at s_scale 1."""
    path = faceid[kind][1]
    base, encoder = models
    adapter = load_adapter(path, base, image_encoder=encoder)
    pipe = IPAdapterPipeline(base, encoder, adapter)
    face_image = tu.test_image(0) if kind == "faceid-plus" else None
    ours = pipe(**faceid_prompt(pipe, FACE, face_image), prompt="the red cat", scale=0.6, num_inference_steps=4,
                height=64, width=64, latents=LATENTS).pixels  # fmt: skip
    assert np.abs(ours - run_diffusers(sd15, path, kind, shortcut)).max() <= 5e-5
    if kind == "faceid":
        assert np.abs(ours - run_diffusers(sd15, path, kind, shortcut, lora=False)).max() > 1e-2


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("kind, name", [("faceid", "ip-adapter-faceid_sdxl"),
                                        ("faceid-plus", "ip-adapter-faceid-plusv2_sdxl")])  # fmt: skip
def test_sdxl_pipeline_matches_diffusers(sdxl: tu.SavedPipelines, kind: str, name: str, tmp_path):
    """The tiny SDXL pipeline with a FaceID / FaceID Plus v2 file (its LoRA included) vs diffusers', within the
    pipeline test's 5e-5 (measured 2.4e-6 both)."""
    path = official_file(tmp_path, faceid_files.random_faceid_adapter(sdxl.torch_base.unet, kind), "bin", name=name)
    base, encoder = load_base(sdxl.folder, progress=False), load_image_encoder(sdxl.folder / "image_encoder")
    pipe = IPAdapterPipeline(base, encoder, load_adapter(path, base, image_encoder=encoder))
    face_image = tu.test_image(0) if kind == "faceid-plus" else None
    ours = pipe(**faceid_prompt(pipe, FACE, face_image), prompt="the red cat", scale=0.6, num_inference_steps=4,
                height=64, width=64, latents=LATENTS, guidance_scale=7.5).pixels  # fmt: skip
    assert np.abs(ours - run_diffusers(sdxl, path, kind, 1.0 if kind == "faceid-plus" else None)).max() <= 5e-5


@pytest.mark.parity
@pytest.mark.slow
def test_generate_cli_face_embeds_and_s_scale_match_diffusers(sd15: tu.SavedPipelines, faceid: dict, tmp_path):
    """`generate --face-embeds face.npy --image face.png --s-scale 0.7` (FaceID Plus v2) vs diffusers from the noise
    of `--seed 0`; the PNG is 8-bit."""
    np.save(tmp_path / "face.npy", FACE)
    tu.test_image(0).save(tmp_path / "face.png")
    argv = ["--base", str(sd15.folder), "--adapter", str(faceid["faceid-plus"][1]), "--image-encoder",
            str(sd15.folder / "image_encoder"), "--face-embeds", str(tmp_path / "face.npy"), "--image",
            str(tmp_path / "face.png"), "--s-scale", "0.7", "--prompt", "the red cat", "--scale", "0.6", "--steps", "4",
            "--height", "64", "--width", "64", "--seed", "0", "--out", str(tmp_path / "out"),
            "--compile-cache", jax.config.jax_compilation_cache_dir]  # fmt: skip
    assert generate_main(argv) == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["face_embeds"] == str(tmp_path / "face.npy") and settings["s_scale"] == 0.7
    ours = np.asarray(Image.open(tmp_path / "out" / "image_00.png"), np.float32) / 255
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8, 8), jnp.float32))
    theirs = run_diffusers(sd15, faceid["faceid-plus"][1], "faceid-plus", 0.7, latents=noise)[0]
    assert np.abs(ours - theirs).max() <= 1 / 255 + 5e-5


@pytest.mark.parity
def test_sdxl_faceid_lora_lands_on_the_modules_diffusers_puts_it_on(sdxl: tu.SavedPipelines):
    """Every LoRA'd attention projection of the tiny SDXL UNet (its processor ids, attn1 and attn2, 3 transformer
    depths): our merged kernel = diffusers' peft layer's base weight + scaling * B @ A."""
    state = faceid_files.random_faceid_adapter(sdxl.torch_base.unet, "faceid-plus")
    path = official_file(sdxl.folder, state, "bin", name="ip-adapter-faceid-plusv2_sdxl")
    pipe = copy.deepcopy(sdxl.torch_base)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    base = load_base(sdxl.folder, progress=False)
    ours = traverse_util.flatten_dict(load_adapter(path, base).unet_params(base.unet_params))
    checked = 0
    for name, module in pipe.unet.named_modules():
        if "faceid_0" in getattr(module, "lora_A", {}):
            lora = module.lora_B["faceid_0"].weight @ module.lora_A["faceid_0"].weight
            expected = (module.base_layer.weight + module.scaling["faceid_0"] * lora).detach().numpy()
            kernel = np.asarray(ours[torch_key_to_flax_module_path(name) + ("kernel",)])
            np.testing.assert_allclose(kernel.T, expected, rtol=1e-5, atol=1e-6, err_msg=name)
            checked += 1
    assert checked == 4 * len(sdxl.torch_base.unet.attn_processors) > 0  # counted before IP processors are set


@pytest.mark.slow
def test_plusv2_file_names_turn_the_shortcut_on(faceid: dict, models):
    base, encoder = models
    path = faceid["faceid-plus"][1]
    assert load_adapter(path, base).image_proj.shortcut_scale == 1.0
    v1 = path.with_name("ip-adapter-faceid-plus_sd15.bin")
    v1.write_bytes(path.read_bytes())
    v1_adapter = load_adapter(v1, base)
    assert v1_adapter.image_proj.shortcut_scale is None
    pipe = with_shortcut_scale(IPAdapterPipeline(base, encoder, v1_adapter), 0.25)
    assert pipe.adapter.image_proj.shortcut_scale == 0.25


def test_a_faceid_lora_that_does_not_fit_is_one_clear_error(faceid: dict, models, tmp_path):
    state = copy.deepcopy(faceid["faceid"][0])
    state["ip_adapter"]["3.to_v_lora.up.weight"] = np.zeros((5, faceid_files.LORA_RANK), np.float32)
    path = official_file(tmp_path, state, "safetensors")
    with pytest.raises(
        ConversionError, match=r"'3\.to_v_lora\.up\.weight': expected \(\d+, 4\) for .*, found \(5, 4\)"
    ):
        load_adapter(path, models[0])


def test_convert_inspect_describes_a_faceid_file(faceid: dict, sd15: tu.SavedPipelines, capsys):
    assert convert_main(["inspect", str(faceid["faceid-plus"][1])]) == 0
    out = capsys.readouterr().out
    processors = len(sd15.torch_base.unet.attn_processors)
    assert re.search(r"adapter_kind: +faceid-plus\n", out)
    assert re.search(
        rf"cross-attention layers: +{processors // 2} \(ids 1..{processors - 1}\), cross_attention_dim 32", out
    )
    assert re.search(rf"UNet LoRA: +rank {faceid_files.LORA_RANK} on {processors} attention processors", out)


def test_faceid_prompt_checks_its_inputs(faceid: dict):
    _, module, params = load_image_proj(faceid["faceid"][0]["image_proj"])
    adapter = types.SimpleNamespace(kind="faceid", image_proj=module)
    fake = types.SimpleNamespace(adapters=(adapter,), image_encoder=None)
    prompt = faceid_prompt(fake, FACE[0])
    assert prompt["image_embeds"].shape == (1, faceid_files.ID_DIM) and not prompt["negative_image_embeds"].any()
    with pytest.raises(ValueError, match=r"face embeddings must be \(K, 24\) .*got \(1, 512\)"):
        faceid_prompt(fake, np.zeros((1, 512)))
    with pytest.raises(ValueError, match="face_image is for FaceID Plus"):
        faceid_prompt(fake, FACE, tu.test_image(0))
    with pytest.raises(ValueError, match="FaceID adapters read identity embeddings; pass image_embeds from"):
        load_image_encoder("tiny").features([tu.test_image(0)], "faceid")
    adapter.kind = "plus"
    with pytest.raises(ValueError, match="input of FaceID adapters; this adapter is a 'plus' one"):
        faceid_prompt(fake, FACE)


def test_generate_cli_face_embeds_usage_errors(tmp_path, capsys):
    common = ["--base", "b", "--adapter", "a.bin", "--image-encoder", "e", "--out", str(tmp_path)]
    assert generate_main(common) == 2
    assert "has no --image (or --face-embeds, for a FaceID adapter)" in capsys.readouterr().err
    assert generate_main([*common, "--face-embeds", "f.npy", "--negative-image", "n.png"]) == 2
    assert "--negative-image does not go with --face-embeds" in capsys.readouterr().err
