"""CLIP-I / CLIP-T evaluation: metric code vs transformers' PyTorch `CLIPModel`, and `ipadapter-jax eval` end to end.

Metric parity: a tiny random `CLIPModel` (+ the tiny tokenizer) saved with `save_pretrained`, loaded by
`ipadapter_jax.evaluation.clip_score`, vs the same folder in PyTorch: embeddings and cosines within 1e-5.
End to end: a tiny SD1.5-like pipeline with DDIM, a CLIP image encoder and a random base adapter
(`ipadapter_jax.testing.pipeline_fixtures`), 3 prompt images from `ipadapter_jax.data.synthetic`, 2 DDIM steps, 2
samples, 64 px.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter_jax import paths, staging
from ipadapter_jax.cli import evaluate as cli
from ipadapter_jax.data import synthetic
from ipadapter_jax.evaluation import evaluate, results, statistics
from ipadapter_jax.evaluation.clip_score import CLIPScorer, clipscore, cosine, load_eval_clip
from ipadapter_jax.testing import gcs, pipeline_fixtures, tiny_folders

pytestmark = pytest.mark.parity

TOLERANCE = 1e-5
CAPTIONS = ["a red circle", "the dog and the cat", "", "z" * 40]  # the empty and the over-long caption included


def save_tiny_clip(folder: Path):
    """A random 2-layer `CLIPModel` (text over the tiny tokenizer's vocabulary, 224 px vision in 32 px patches)
    with perturbed norms, saved with the tokenizer; returns the PyTorch model."""
    from transformers import CLIPConfig, CLIPModel

    vocab = 58
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tiny_folders.MAX_TOKENS,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        ),
        vision_config=dict(
            hidden_size=40,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=24,
    )
    torch.manual_seed(0)
    model = tiny_folders.perturb(CLIPModel(config).eval(), 0)
    model.save_pretrained(folder)
    tiny_folders.tokenizer().save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("eval_clip")
    return folder, save_tiny_clip(folder)


def test_embeddings_and_cosines_match_pytorch_clip(clip_folder):
    from transformers import CLIPImageProcessor, CLIPTokenizer

    folder, torch_model = clip_folder
    sizes = [(96, 80), (64, 64), (50, 120), (224, 224), (300, 200)]
    images = [pipeline_fixtures.test_image(i, size) for i, size in enumerate(sizes)]
    scorer = CLIPScorer(load_eval_clip(folder), batch_size=2)  # 5 images: 3 batches, the last one padded
    ours_image = scorer.image_embeddings(images)
    ours_text = scorer.text_embeddings(CAPTIONS)

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokens = tokenizer(
        CAPTIONS, padding="max_length", truncation=True, max_length=tiny_folders.MAX_TOKENS, return_tensors="pt"
    )
    pixels = CLIPImageProcessor()(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref_image = torch_model.get_image_features(pixel_values=pixels).numpy()
        ref_text = torch_model.get_text_features(**tokens).numpy()

    assert ours_image.shape == ref_image.shape == (5, 24) and ours_text.shape == ref_text.shape == (4, 24)
    np.testing.assert_allclose(ours_image, ref_image, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(ours_text, ref_text, atol=TOLERANCE, rtol=0)

    pairs = [(0, 1), (2, 3), (4, 0), (1, 1)]
    ref_unit_image = ref_image / np.linalg.norm(ref_image, axis=-1, keepdims=True)
    ref_unit_text = ref_text / np.linalg.norm(ref_text, axis=-1, keepdims=True)
    for i, j in pairs:
        ours = cosine(ours_image[i : i + 1], ours_image[j : j + 1])[0]
        np.testing.assert_allclose(ours, ref_unit_image[i] @ ref_unit_image[j], atol=TOLERANCE)
    ours_clip_t = cosine(ours_image[:4], ours_text)
    np.testing.assert_allclose(ours_clip_t, np.sum(ref_unit_image[:4] * ref_unit_text, axis=-1), atol=TOLERANCE)
    # CLIPScore against transformers' own logits: logits_per_image = exp(logit_scale) * cos.
    with torch.no_grad():
        logits = torch_model(pixel_values=pixels[:4], **tokens).logits_per_image.numpy()
    np.testing.assert_allclose(ours_clip_t, np.diag(logits) / torch_model.logit_scale.exp().item(), atol=TOLERANCE)
    np.testing.assert_allclose(clipscore(ours_clip_t), 2.5 * np.maximum(ours_clip_t, 0))
    assert cosine(ours_image[:1], ours_image[:1])[0] == pytest.approx(1.0, abs=1e-6)


def test_read_results_keeps_whole_prompts_only(tmp_path):
    path = tmp_path / results.RESULTS_NAME
    caption = 'a, "quoted" caption'
    rows = [results.Row(i, f"{i}.png", caption, s, 10 + i, 0.5 + i / 10, 0.25) for i in range(3) for s in range(2)]
    results.write_rows(path, rows[:-1])  # prompt 2 lacks its second sample
    with open(path, "a") as f:
        f.write("3,3.png,torn,0,13,0.7")  # a line cut off mid-write: no newline
    complete = results.read_results(path, num_samples=2)
    assert sorted(complete) == [0, 1] and complete[1] == rows[2:4]
    assert results.read_results(path, num_samples=2) == complete  # the file was rewritten without the rest
    assert path.read_text().count("\n") == 5


def test_bootstrap_interval():
    values = np.random.default_rng(0).normal(0.8, 0.05, 400)
    low, high = statistics.bootstrap_interval(values)
    assert low < values.mean() < high and high - low == pytest.approx(2 * 1.96 * 0.05 / 20, rel=0.2)
    assert statistics.bootstrap_interval(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))


def test_eval_prompts_one_per_image_first_caption(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
        "annotations": [
            {"image_id": 2, "caption": "  "},
            {"image_id": 2, "caption": "two"},
            {"image_id": 1, "caption": "one"},
            {"image_id": 2, "caption": "two again"},
            {"image_id": 9, "caption": "orphan"},
            {"image_id": 3, "caption": "three"},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    prompts, skipped = evaluate.eval_prompts(path)
    expected = [("b.jpg", "two"), ("a.jpg", "one"), ("c.jpg", "three")]
    assert prompts == [evaluate.EvalPrompt(i, *pair) for i, pair in enumerate(expected)]
    assert skipped == 2 and evaluate.eval_prompts(path, limit=2)[0] == prompts[:2]


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, clip_folder) -> dict:
    """A tiny SD1.5-like pipeline (DDIM, image encoder, random base adapter) and 4 synthetic captioned images."""
    models = tmp_path_factory.mktemp("eval_models")
    pipeline_fixtures.save_pipeline(models, "sd15")
    data = tmp_path_factory.mktemp("eval_data")
    annotations = synthetic.write_dataset(str(data), 4, size=64)
    return {
        "annotations": annotations,
        "root": str(data / "images"),
        "args": [
            "--annotations",
            annotations,
            "--image-root",
            str(data / "images"),
            "--base",
            str(models),
            "--adapter",
            str(pipeline_fixtures.adapter_file(models, "base")),
            "--image-encoder",
            str(models / "image_encoder"),
            "--eval-clip",
            str(clip_folder[0]),
            "--steps",
            "2",
            "--num-samples",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--batch-images",
            "2",
            "--contact-sheet",
            "2",
            "--bootstrap",
            "200",
            "--compile-cache",
            "none",
            "--quiet",
        ],
    }


def _rows(folder: Path) -> list[dict]:
    with open(folder / results.RESULTS_NAME, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_eval_run_resume_sweep_and_compare(tmp_path, eval_inputs, capsys):
    args = eval_inputs["args"]
    run_dir = tmp_path / "run"
    assert cli.main(["run", *args, "--limit", "3", "--out", str(run_dir)]) == 0

    rows = _rows(run_dir)
    keys = [(int(r["index"]), int(r["sample"]), int(r["seed"])) for r in rows]
    assert keys == [(i, s, i) for i in range(3) for s in range(2)]  # seed = --seed 0 + prompt index
    captions = json.loads(Path(eval_inputs["annotations"]).read_text())
    assert [r["caption"] for r in rows[::2]] == [c["text"] for c in captions[:3]]
    for r in rows:
        assert -1 <= float(r["clip_i"]) <= 1 and -1 <= float(r["clip_t"]) <= 1
    summary = json.loads((run_dir / results.SUMMARY_NAME).read_text())
    assert summary["images"] == 3 and summary["samples"] == 6 and summary["prompts_scored_this_run"] == 3
    for name, metric in summary["metrics"].items():
        low, high = metric["ci95"]
        assert low <= metric["mean"] <= high, name
    clip_i = [float(r["clip_i"]) for r in rows]
    assert summary["metrics"]["clip_i"]["mean"] == pytest.approx(np.mean(clip_i), abs=1e-6)
    assert summary["settings"]["num_inference_steps"] == 2 and summary["settings"]["prompt"] == ""
    assert Image.open(run_dir / results.SHEET_NAME).size == (3 * 64, 2 * 64)  # [prompt image, 2 samples] x 2 prompts
    samples = sorted(p.name for p in (run_dir / results.SAMPLES_DIR).iterdir())
    assert samples == ["00000_0.png", "00000_1.png", "00001_0.png", "00001_1.png"]

    # Resume: nothing new to score; a torn last prompt is scored again, with the same numbers (same seed).
    assert cli.main(["run", *args, "--limit", "3", "--out", str(run_dir)]) == 0
    assert json.loads((run_dir / results.SUMMARY_NAME).read_text())["prompts_scored_this_run"] == 0
    text = (run_dir / results.RESULTS_NAME).read_text()
    (run_dir / results.RESULTS_NAME).write_text(text[: text.rstrip("\n").rfind("\n") + 1] + "2,00002.png,torn")
    assert cli.main(["run", *args, "--limit", "3", "--out", str(run_dir)]) == 0
    assert json.loads((run_dir / results.SUMMARY_NAME).read_text())["prompts_scored_this_run"] == 1
    again = _rows(run_dir)
    np.testing.assert_allclose([float(r["clip_i"]) for r in again], clip_i, atol=1e-5)

    # The same folder with other settings is refused.
    capsys.readouterr()
    assert cli.main(["run", *args, "--limit", "3", "--seed", "1", "--out", str(run_dir)]) == 1
    assert "settings.seed: 0 -> 1" in capsys.readouterr().err

    # A scale sweep on the same prompts and seeds, of the "linear" preset (the scale on every layer): scale 1
    # repeats the first run's numbers.
    sweep = tmp_path / "sweep"
    sweep_args = ["--limit", "2", "--scale", "0", "--scale", "1", "--weight-type", "linear"]
    assert cli.main(["run", *args, *sweep_args, "--out", str(sweep)]) == 0
    run_settings = json.loads((sweep / "scale_1" / results.RUN_NAME).read_text())["settings"]
    assert run_settings["scale"] == {"name": "linear", "weight": 1.0, "composition_weight": None, "boost": None}
    swept = {scale: [float(r["clip_i"]) for r in _rows(sweep / f"scale_{scale}")] for scale in (0, 1)}
    np.testing.assert_allclose(swept[1], clip_i[:4], atol=1e-5)
    assert swept[0] != swept[1]  # the random adapter changes the images
    comparison = json.loads((sweep / "comparison.json").read_text())["comparisons"][0]
    assert comparison["paired_images"] == 2
    for name, metric in comparison["metrics"].items():
        assert metric["difference"] == pytest.approx(metric["other"] - metric["baseline"], abs=1e-9), name
        assert metric["ci95"][0] <= metric["difference"] <= metric["ci95"][1]

    # compare: paired on the 2 common prompt images; refused for runs with another seed.
    out = tmp_path / "compare.json"
    assert cli.main(["compare", str(sweep / "scale_0"), str(run_dir), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["comparisons"][0]["paired_images"] == 2
    run_json = json.loads((sweep / "scale_0" / results.RUN_NAME).read_text())
    run_json["settings"]["seed"] = 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / results.RUN_NAME).write_text(json.dumps(run_json))
    assert cli.main(["compare", str(run_dir), str(tmp_path / "other"), "--out", str(out)]) == 1
    assert "seed (0 vs 5)" in capsys.readouterr().err


def test_eval_run_composition_weight_needs_a_weight_type(tmp_path, capsys):
    args = ["--annotations", "a.json", "--image-root", "i", "--base", "b", "--adapter", "a", "--image-encoder", "e"]
    assert cli.main(["run", *args, "--eval-clip", "c", "--out", str(tmp_path), "--composition-weight", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--composition-weight needs --weight-type" in err[0]


@pytest.mark.slow
def test_eval_run_reads_and_writes_a_bucket(tmp_path, eval_inputs):
    """Annotations, images and the output folder in a bucket (fake-gcs-server on 127.0.0.1): the run folder is
    uploaded complete, and a rerun resumes from it."""
    if not gcs.available():
        pytest.skip("the `test` extra (fake-gcs-server) is not installed")
    with gcs.emulator(str(tmp_path)) as server, server.environment():
        bucket = server.create_bucket()
        staging.upload(eval_inputs["root"], f"{bucket}/images", what="images", progress=False)
        staging.upload(eval_inputs["annotations"], f"{bucket}/captions.json", what="annotations", progress=False)
        moved = {eval_inputs["annotations"]: f"{bucket}/captions.json", eval_inputs["root"]: f"{bucket}/images"}
        args = [moved.get(arg, arg) for arg in eval_inputs["args"]]
        out = f"{bucket}/eval"
        assert cli.main(["run", *args, "--limit", "2", "--out", out]) == 0
        summary = paths.read_json(f"{out}/{results.SUMMARY_NAME}")
        assert summary["images"] == 2 and summary["prompts_scored_this_run"] == 2
        assert {results.RESULTS_NAME, results.SUMMARY_NAME, results.SHEET_NAME} <= set(paths.listdir(out))
        # Another host: nothing staged there yet; the bucket's folder is resumed (`environment()` restores the
        # variable).
        os.environ[staging.CACHE_ENV] = str(tmp_path / "fresh_cache")
        assert cli.main(["run", *args, "--limit", "2", "--out", out]) == 0
        assert paths.read_json(f"{out}/{results.SUMMARY_NAME}")["prompts_scored_this_run"] == 0
