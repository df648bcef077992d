"""`ipadapter-jax ablate`: the statistics of the report against hand-computed numbers on tiny fixed tables, the
controllability scorer against hand-built embeddings, caption edits, variant parsing, the tiny Resampler spec, and a
2-variant x 1-seed run end to end (report fields, pictures, a rerun that trains nothing)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ipadapter_jax.cli.ablate import main as ablate_main
from ipadapter_jax.data.synthetic import edit_caption
from ipadapter_jax.evaluation import ablation_stats
from ipadapter_jax.training import ablation
from ipadapter_jax.training.config import ConfigError
from ipadapter_jax.weights import known_models, load_adapter, load_base, load_image_encoder, new_adapter

SCALES = ["0.0", "1.0"]


def _scores(per_metric: dict[str, list[float]]) -> dict:
    """One run's scores: the same per-prompt values at both scales, for every metric."""
    return {metric: {s: per_metric.get(metric, [0.0, 0.0]) for s in SCALES} for metric in ablation_stats.METRICS}


def test_controllability_against_hand_built_embeddings():
    samples = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    edited, original = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    hit, margin = ablation_stats.controllability(samples, edited, original)
    # cos([3, 4], [1, 0]) = 0.6, cos([3, 4], [0, 1]) = 0.8
    np.testing.assert_allclose(margin, [1.0, -1.0, -0.2], atol=1e-6)
    np.testing.assert_array_equal(hit, [1.0, 0.0, 0.0])


def test_variant_means_and_paired_differences_against_hand_computed_numbers():
    # Variant b - a per (seed, prompt) unit: clip_i 0.1 everywhere; control_hit 0, 0, 0, 1.
    scores = {
        "a": {0: _scores({"clip_i": [0.2, 0.4], "control_hit": [0.0, 1.0]}), 1: _scores({"clip_i": [0.6, 0.0]})},
        "b": {0: _scores({"clip_i": [0.3, 0.5], "control_hit": [0.0, 1.0]}), 1: _scores({"clip_i": [0.7, 0.1]})},
    }
    table = ablation_stats.summarize_variants(scores, SCALES, num_resamples=1000)
    assert table["a"]["clip_i"]["1.0"]["mean"] == pytest.approx(0.3)  # (0.2 + 0.4 + 0.6 + 0.0) / 4
    assert table["b"]["clip_i"]["0.0"]["n"] == 4
    assert table["a"]["control_hit"]["0.0"]["mean"] == pytest.approx(0.25)
    low, high = table["a"]["clip_i"]["0.0"]["ci95"]
    assert 0.0 <= low < 0.3 < high <= 0.6  # inside the range of the four values, around the mean

    pair = ablation_stats.paired_difference(scores, "a", "b", SCALES, num_resamples=1000)["metrics"]
    # A constant difference: every resample's mean is 0.1.
    assert pair["clip_i"]["1.0"]["difference"] == pytest.approx(0.1)
    np.testing.assert_allclose(pair["clip_i"]["1.0"]["ci95"], [0.1, 0.1], atol=1e-12)
    assert pair["clip_i"]["1.0"]["other_higher_fraction"] == 1.0
    # control_hit is the same in both: b - a = 0 on every unit.
    assert pair["control_hit"]["0.0"] == {"difference": 0.0, "ci95": [0.0, 0.0], "other_higher_fraction": 0.0, "n": 4}

    # c - a per unit (seed, prompt) = 0, 0, 0, 1: resample means are k/4 with k ~ Binomial(4, 1/4). P(k = 0) = 0.32
    # > 2.5%, so the low end is 0; P(k >= 3) = 0.051 > 2.5% > P(k = 4) = 0.004, so the high end is 0.75.
    scores["c"] = {0: _scores({"control_hit": [0.0, 1.0]}), 1: _scores({"control_hit": [0.0, 1.0]})}
    pair = ablation_stats.paired_difference(scores, "a", "c", SCALES, num_resamples=1000)["metrics"]["control_hit"]
    assert pair["0.0"]["difference"] == pytest.approx(0.25)
    np.testing.assert_allclose(pair["0.0"]["ci95"], [0.0, 0.75])
    assert pair["0.0"]["other_higher_fraction"] == 0.25
    # Pairs are (seed, prompt) units common to both: a variant with seed 0 only pairs on 2 units.
    scores["d"] = {0: scores["b"][0]}
    assert ablation_stats.paired_difference(scores, "a", "d", SCALES)["metrics"]["clip_i"]["0.0"]["n"] == 2


def test_caption_edits_change_one_attribute():
    caption = "a small red circle at the left on a striped green background"
    # The next colour that is not the background's (green is skipped).
    assert edit_caption(caption, "colour") == "a small blue circle at the left on a striped green background"
    assert edit_caption(caption, "background") == "a small red circle at the left on a striped blue background"
    assert edit_caption(caption, "shape") == "a small red square at the left on a striped green background"
    assert edit_caption(caption, "texture") == "a small red circle at the left on a checked green background"
    assert edit_caption(caption, "place") == "a small red circle in the middle on a striped green background"
    assert edit_caption(caption, "size") == "a large red circle at the left on a striped green background"
    assert edit_caption("a large black cross at the right on a checked red background", "colour") == (
        "a large green cross at the right on a checked red background"  # black is the last colour: wraps, skips red
    )
    assert edit_caption("a large black cross at the right on a checked red background", "texture") == (
        "a large black cross at the right on a red background"  # plain: no texture word
    )
    with pytest.raises(ValueError, match="not a caption"):
        edit_caption("a photo of a cat", "shape")
    with pytest.raises(ValueError, match="attribute must be one of"):
        edit_caption(caption, "mood")


def _caches(config) -> tuple[str, str]:
    return f"c_{config.model.adapter_kind}", "h"


def test_variants_parse_and_apply_to_the_demo_preset():
    variant = ablation.parse_variant("nodrop:data.drop_rates=(0.0, 0.0, 0.0),model.num_tokens=8")
    assert variant == ablation.Variant("nodrop", ("data.drop_rates=(0.0, 0.0, 0.0)", "model.num_tokens=8"))
    settings = ablation.AblationSettings(steps=7, data_seed=3)
    configs = [ablation.run_config(settings, variant, seed, _caches) for seed in (0, 1)]
    for seed, config in enumerate(configs):
        assert (config.seed, config.data.shuffle_seed(config.seed)) == (seed, 3)  # only the init/step seed varies
        assert (config.total_steps, config.model.num_tokens, config.data.drop_rates) == (7, 8, (0.0, 0.0, 0.0))
        assert (config.data.path, config.data.batch_size_per_device) == ("c_base", 16)  # the demo preset's batch
    plus = ablation.preset_variants("tokens")[1]
    config = ablation.run_config(settings, plus, 0, _caches)
    assert (config.model.adapter_kind, config.model.resampler_width, config.data.path) == ("plus", 64, "c_plus")
    with pytest.raises(ConfigError, match="model.nope"):
        ablation.run_config(settings, ablation.parse_variant("x:model.nope=1"), 0, _caches)
    with pytest.raises(ConfigError, match="variant name"):
        ablation.parse_variant("a/b:model.num_tokens=2")


def test_cli_rejects_a_bad_override_before_any_work(tmp_path, capsys):
    status = ablate_main(["--variants", "x:model.nope=1", "--out", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("error:") and "variant x: unknown config field(s) model.nope" in err[0]
    ), err
    assert not (tmp_path / "out").exists()


def test_tiny_resampler_spec_and_its_official_file_round_trip(tmp_path):
    from ipadapter_jax.training.hooks import export_adapter

    base, image_encoder = load_base("tiny", progress=False), load_image_encoder("tiny")
    spec = known_models.image_proj_spec("plus", 32, image_encoder.config, 16, resampler_width=64, resampler_depth=1)
    assert spec.hparams == dict(
        dim=64, heads=1, num_queries=16, embedding_dim=32, output_dim=32, depth=1, dim_head=64, ff_mult=4
    )
    with pytest.raises(ValueError, match="multiple of its head size 64"):
        known_models.image_proj_spec("plus", 32, image_encoder.config, 16, resampler_width=96)
    adapter = new_adapter("plus", base, image_encoder, num_tokens=16, resampler_width=64, resampler_depth=1)
    path = str(tmp_path / "ip-adapter.safetensors")
    export_adapter(adapter.params, path, {})
    loaded = load_adapter(path, base, image_encoder=image_encoder)
    flat = dict(_leaves(adapter.params["image_proj"]))
    assert sum(x.size for x in flat.values()) < 100_000  # ~80M with the reference's 1280 x 4 Resampler
    for key, value in _leaves(loaded.params["image_proj"]):
        np.testing.assert_array_equal(value, flat[key])


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield prefix + key, np.asarray(value)


@pytest.mark.slow
def test_two_variants_one_seed_report_then_a_rerun_trains_nothing(tmp_path):
    out = tmp_path / "ablate"
    argv = ["--preset", "designs", "--seeds", "1", "--out", str(out), "--steps", "12", "--images", "32"]
    argv += ["--prompts", "2", "--samples", "1", "--inference-steps", "4", "--scales", "0,1"]
    assert ablate_main(argv) == 0
    for name in ablation.REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["decoupled", "simple"] and report["trained_this_invocation"] == 2
    for name, export in zip(names, ("ip-adapter.safetensors", "ip-adapter.msgpack")):  # simple: no official layout
        run = out / "runs" / name / "seed_0"
        assert {"config.json", "metrics.jsonl", "scores.json", "result.json", export} <= set(os.listdir(run))
        saved = json.loads((run / "config.json").read_text())
        assert saved["config"]["data"]["seed"] == 0 and saved["config"]["total_steps"] == 12
        scores = json.loads((run / "scores.json").read_text())
        for metric in ablation_stats.METRICS:
            for scale in ("0.0", "1.0"):
                entry = report["table"][name][metric][scale]
                assert entry["n"] == 2 and entry["mean"] == pytest.approx(np.mean(scores[metric][scale]))
                assert entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
    (pair,) = report["differences"]
    assert (pair["baseline"], pair["other"]) == tuple(names)
    # At scale 0 the adapter is off: both variants sample the base model from the same noise (the simple design's
    # attention over text + zero-weighted image tokens is the text-only one up to float32 rounding, which 20 sampling
    # steps carry into the CLIP cosines: 1.2e-5 measured on the current tiny base, ~1e-6 on the earlier one; the
    # designs differ by > 0.05 at scale 1).
    at_zero = pair["metrics"]["clip_i"]["0.0"]
    assert at_zero["n"] == 2 and at_zero["difference"] == pytest.approx(0.0, abs=1e-4)
    assert at_zero["ci95"] == pytest.approx([0.0, 0.0], abs=1e-4)
    assert "| simple - decoupled | clip_i |" in (out / "report.md").read_text()

    finished = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed_*/*.json")}
    assert ablate_main(argv) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["trained_this_invocation"] == 0 and {r["status"] for r in again["runs"]} == {"reused"}
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed_*/*.json")} == finished
    assert again["table"] == report["table"]
    # Other settings in the same folder: one error line, exit 2.
    assert ablate_main(argv[:-2] + ["--scales", "0,0.5"]) == 2
