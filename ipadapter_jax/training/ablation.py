"""Ablations on the embedded world (`ipadapter-jax ablate`): variants x seeds trained on the same data in the same
order, each scored on held-out image prompts at several IP scales, and one report with intervals.

    out/
      ablation.json            the settings the folder was made with (a rerun must match them)
      data/                    procedural training + held-out datasets and their embedding caches, built once
      runs/VARIANT/seed_S/     config.json, metrics.jsonl, checkpoints/, ip-adapter.safetensors (or .msgpack for a
                               design without the official layout), samples/, scores.json and result.json (written
                               last: the run is finished once it exists)
      report.md report.json    per variant and scale: means and 95% bootstrap intervals over (seed, prompt);
                               paired differences between variants (`ipadapter_jax.evaluation.ablation_stats`)
      clip_i_vs_scale.png loss_curves.png grid.png

A variant is a name + overrides of the `demo` preset (`model.num_tokens=16`, ml_collections' `--config.x=y`
syntax). Every run has `data.seed` = the settings' data seed: the seed of a run changes its adapter's init and the
step's noise only, never the batches or the condition drops. A rerun skips finished runs and resumes an
interrupted one from its last checkpoint.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tqdm
from PIL import Image

from ipadapter_jax.data import synthetic
from ipadapter_jax.evaluation import ablation_stats, results
from ipadapter_jax.evaluation.clip_score import CLIPScorer, cosine
from ipadapter_jax.evaluation.plots import draw_lines, draw_variant_grid, read_losses
from ipadapter_jax.evaluation.tiny_clip import tiny_eval_clip
from ipadapter_jax.presets import get_preset
from ipadapter_jax.training import embedded_world
from ipadapter_jax.training.ablation_presets import ABLATION_PRESETS
from ipadapter_jax.training.cache_encodings import build_cache
from ipadapter_jax.training.config import ConfigError, TrainConfig
from ipadapter_jax.training.hooks import final_export
from ipadapter_jax.training.loop import train
from ipadapter_jax.weights import load_base, load_image_encoder

SETTINGS_FILE, RESULT_FILE, SCORES_FILE, CONFIG_FILE = "ablation.json", "result.json", "scores.json", "config.json"
REPORT_FILES = ("report.md", "report.json", "clip_i_vs_scale.png", "loss_curves.png", "grid.png")
HELD_OUT = 64  # held-out images: the loss curves score the first global batch of them
EDITED = ("colour", "shape", "place", "size")  # prompt i's text changes EDITED[i % 4] of its caption


@dataclasses.dataclass(frozen=True)
class Variant:
    """A name (a folder name: letters, digits, `_.-`) and `key=value` overrides of the base preset."""

    name: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AblationSettings:
    """What every run shares. The defaults fit the `tokens` preset x 3 seeds in ~13 min on 2 CPU cores."""

    steps: int = 500  # training steps per run (batch 16): the demo preset's
    num_images: int = 512  # procedural training images
    num_prompts: int = 8  # held-out image prompts
    samples_per_prompt: int = 2
    inference_steps: int = 20  # DDIM
    guidance_scale: float = 5.0
    scales: tuple[float, ...] = (0.0, 0.5, 1.0)
    data_seed: int = 0  # the training data, its order and its condition drops
    prompt_seed: int = 1  # the held-out image prompts (the held-out loss batch uses prompt_seed + 1)
    num_resamples: int = 1000  # bootstrap
    base_preset: str = "demo"


def write_json(path: Path, data: Any) -> None:
    """`data` as JSON in `path` (its folder created), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results.write_json(path, data)


def parse_variant(text: str) -> Variant:
    """`NAME` or `NAME:key=value,key=value` -> Variant (a value may hold commas inside brackets).

    Raises:
      ConfigError: a bad name or an override without `=`.
    """
    name, _, rest = text.partition(":")
    overrides = tuple(part.strip() for part in re.split(r",(?![^()\[\]]*[)\]])", rest) if part.strip())
    return _checked(Variant(name, overrides))


def preset_variants(name: str) -> list[Variant]:
    """The variants of an ablation preset (`ablation_presets.ABLATION_PRESETS`)."""
    if name not in ABLATION_PRESETS:
        raise ConfigError(f"unknown ablation preset {name!r}; presets: {', '.join(ABLATION_PRESETS)}")
    return [_checked(Variant(v, overrides)) for v, overrides in ABLATION_PRESETS[name].items()]


def _checked(variant: Variant) -> Variant:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", variant.name):
        raise ConfigError(f"variant name {variant.name!r}: use letters, digits and _.- (it names the run's folder)")
    for override in variant.overrides:
        if "=" not in override:
            raise ConfigError(f"variant {variant.name}: override {override!r} is not key=value")
    return variant


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """`key.path=value` overrides, values read as Python literals (strings where they are not one, or where the
    field is a string). Unknown fields surface in `TrainConfig.from_config_dict`."""
    for override in overrides:
        key, _, text = override.partition("=")
        *parents, leaf = key.strip().split(".")
        node = config
        for part in parents:
            if part not in node:
                raise ConfigError(f"override {override!r}: the config has no group {key.rsplit('.', 1)[0]!r}")
            node = node[part]
        current = node.get(leaf)
        try:
            value = text if isinstance(current, str) else ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        try:
            node[leaf] = value
        except TypeError as err:
            raise ConfigError(f"override {override!r}: {err}") from None
    return config


def run_config(settings: AblationSettings, variant: Variant, seed: int, data: Any) -> TrainConfig:
    """The base preset with the run's steps, seeds and datasets, then the variant's overrides. `data(config)` ->
    (training cache, held-out cache) with the encodings the ConfigDict's adapter kind reads."""
    config = apply_overrides(get_preset(settings.base_preset), variant.overrides)
    config.seed, config.data.seed, config.total_steps = seed, settings.data_seed, settings.steps
    config.checkpoint_every = config.export_every = settings.steps
    config.eval_every = config.log_every = max(1, settings.steps // 20)
    config.tensorboard = False
    TrainConfig.from_config_dict(config)  # the variant's fields checked before any data is built
    config.data.path, config.data.eval_path = data(config)
    return TrainConfig.from_config_dict(config)


class _World:
    """The shared data (built on first use, once per output folder) and the evaluation models (loaded once)."""

    def __init__(self, out: Path, settings: AblationSettings, log: Any):
        self.out, self.settings, self.log = out, settings, log
        self._models: tuple | None = None

    def dataset(self, name: str, num_images: int, seed: int) -> str:
        marker = self.out / "data" / f"{name}.json"
        if not marker.exists():
            root = self.out / "data" / name
            shutil.rmtree(root, ignore_errors=True)
            write_json(marker, {"path": embedded_world.build_data(str(root), num_images, seed, log=self.log)})
        return json.loads(marker.read_text())["path"]

    def caches(self, config: ml_collections.ConfigDict) -> tuple[str, str]:
        """(training cache, held-out cache) with the image encodings `config`'s adapter kind reads."""
        kind = config.model.adapter_kind
        s, paths = self.settings, []
        for name, count, seed in (("train", s.num_images, s.data_seed), ("held_out", HELD_OUT, s.prompt_seed + 1)):
            marker = self.out / "data" / f"{name}_cache_{kind}.json"
            if not marker.exists():
                raw, cache = self.dataset(name, count, seed), self.out / "data" / f"{name}_cache_{kind}"
                shutil.rmtree(cache, ignore_errors=True)
                typed = TrainConfig.from_config_dict(config)
                build_cache(typed, raw, str(cache), str(self.out / "data"), batch_size=32)
                write_json(marker, {"path": str(cache)})
            paths.append(json.loads(marker.read_text())["path"])
        return paths[0], paths[1]

    def models(self) -> tuple:
        """(base, image encoder, scorer, prompts, captions, edited captions)."""
        if self._models is None:
            base, image_encoder = load_base("tiny", progress=False), load_image_encoder("tiny")
            scorer = CLIPScorer(tiny_eval_clip(base, image_encoder))
            prompts, captions = embedded_world.held_out_prompts(self.settings.num_prompts, self.settings.prompt_seed)
            edited = [synthetic.edit_caption(c, EDITED[i % len(EDITED)]) for i, c in enumerate(captions)]
            self._models = (base, image_encoder, scorer, prompts, captions, edited)
        return self._models


def evaluate_run(world: _World, export: str, samples_dir: Path) -> dict:
    """The run's scores ({metric: {scale: [per prompt]}}, `ablation_stats.METRICS`); the first sample of every
    image-only prompt and scale saved in `samples_dir`."""
    s = world.settings
    base, image_encoder, scorer, prompts, captions, edited = world.models()
    pipe, _ = embedded_world.make_pipeline(base, image_encoder, export)
    common = dict(
        samples_per_prompt=s.samples_per_prompt,
        inference_steps=s.inference_steps,
        guidance_scale=s.guidance_scale,
        seed=s.data_seed,
        progress=False,
        log=lambda _: None,
    )
    image_only = embedded_world.generate(pipe, prompts, s.scales, **common)
    with_text = embedded_world.generate(pipe, prompts, s.scales, texts=edited, **common)
    prompt_embeds = scorer.image_embeddings(prompts)
    original_text, edited_text = scorer.text_embeddings(captions), scorer.text_embeddings(edited)
    scores: dict = {metric: {} for metric in ablation_stats.METRICS}
    samples_dir.mkdir(parents=True, exist_ok=True)
    for scale in s.scales:
        key = str(scale)
        for metric in scores:
            scores[metric][key] = []
        for i in range(len(prompts)):
            image_embeds = scorer.image_embeddings(image_only[scale][i])
            text_embeds = scorer.image_embeddings(with_text[scale][i])
            hit, margin = ablation_stats.controllability(text_embeds, edited_text[i : i + 1], original_text[i : i + 1])
            scores["clip_i"][key].append(float(np.mean(cosine(image_embeds, prompt_embeds[i : i + 1]))))
            scores["clip_t"][key].append(float(np.mean(cosine(text_embeds, edited_text[i : i + 1]))))
            scores["control_hit"][key].append(float(hit.mean()))
            scores["control_margin"][key].append(float(margin.mean()))
            image_only[scale][i][0].save(samples_dir / f"scale_{scale:g}_prompt_{i}.png")
    return scores


def _run_one(world: _World, variant: Variant, seed: int, folder: Path) -> dict:
    config = run_config(world.settings, variant, seed, world.caches)
    record = {"variant": dataclasses.asdict(variant), "seed": seed, "config": config.to_dict()}
    saved = folder / CONFIG_FILE
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(record)):
        raise ValueError(f"{saved}: this run was started with another config; use another --out or remove {folder}")
    write_json(saved, record)
    started = time.time()
    train(config, str(folder))
    trained = time.time()
    scores = evaluate_run(world, str(folder / final_export(config.model.design)), folder / "samples")
    write_json(folder / SCORES_FILE, scores)
    result = {"variant": variant.name, "seed": seed, "train_seconds": trained - started}
    result["eval_seconds"] = time.time() - trained
    write_json(folder / RESULT_FILE, result)  # last: the run is finished
    return result


def run_ablation(
    variants: Sequence[Variant], seeds: Sequence[int], out: str | os.PathLike, settings: AblationSettings
) -> dict:
    """Trains and scores every variant x seed not finished yet in `out`; writes the report; returns report.json's
    content.

    Raises:
      ConfigError: an invalid override (before any work), or `out` made with other settings.
    """
    if len({v.name for v in variants}) != len(variants) or not variants or not seeds:
        raise ConfigError("give at least one variant (with distinct names) and one seed")
    out = Path(out)
    recorded = dataclasses.asdict(settings)
    recorded["scales"] = list(settings.scales)
    if (out / SETTINGS_FILE).exists():
        before = json.loads((out / SETTINGS_FILE).read_text())
        differ = [k for k in recorded if before.get(k) != recorded[k]]
        if differ:
            raise ConfigError(
                f"{out / SETTINGS_FILE}: the folder was made with other settings ("
                + ", ".join(f"{k}: {before.get(k)!r} there, {recorded[k]!r} now" for k in differ)
                + "); give another --out"
            )
    for variant in variants:  # every variant's config checked before anything runs
        try:
            run_config(settings, variant, seeds[0], lambda config: ("unused", "unused"))
        except ConfigError as err:
            raise ConfigError(f"variant {variant.name}: {err}") from None
    write_json(out / SETTINGS_FILE, recorded)

    def log(message: str) -> None:
        tqdm.tqdm.write(message, file=sys.stderr)

    world, runs = _World(out, settings, log), []
    bar = tqdm.tqdm(total=len(variants) * len(seeds), desc="ablation runs", unit="run", file=sys.stderr)
    for variant in variants:
        for seed in seeds:
            folder = out / "runs" / variant.name / f"seed_{seed}"
            bar.set_postfix_str(f"{variant.name} seed {seed}")
            if (folder / RESULT_FILE).exists():
                runs.append(dict(json.loads((folder / RESULT_FILE).read_text()), status="reused"))
            else:
                runs.append(dict(_run_one(world, variant, seed, folder), status="trained"))
            bar.update()
    bar.close()
    return write_report(out, variants, seeds, settings, runs)


def write_report(
    out: Path, variants: Sequence[Variant], seeds: Sequence[int], settings: AblationSettings, runs: list
) -> dict:
    """report.json, report.md and the pictures from the finished runs' files in `out`."""
    scales = [str(s) for s in settings.scales]
    folder = {(v.name, s): out / "runs" / v.name / f"seed_{s}" for v in variants for s in seeds}
    scores = {v.name: {s: json.loads((folder[v.name, s] / SCORES_FILE).read_text()) for s in seeds} for v in variants}
    names = [v.name for v in variants]
    report = {
        "variants": [{"name": v.name, "overrides": list(v.overrides)} for v in variants],
        "seeds": list(seeds),
        "scales": scales,
        "settings": dataclasses.asdict(settings),
        "table": ablation_stats.summarize_variants(scores, scales, settings.num_resamples),
        "differences": [
            ablation_stats.paired_difference(scores, names[i], names[j], scales, settings.num_resamples)
            for i in range(len(names))
            for j in range(i + 1, len(names))
        ],
        "runs": runs,
        "trained_this_invocation": sum(run["status"] == "trained" for run in runs),
        "files": {name: str(out / name) for name in REPORT_FILES},
    }
    write_json(out / "report.json", report)
    (out / "report.md").write_text(ablation_stats.report_markdown(report))
    clip_i = {
        name: [(float(s), e["mean"], *e["ci95"]) for s, e in report["table"][name]["clip_i"].items()] for name in names
    }
    draw_lines(clip_i, str(out / "clip_i_vs_scale.png"), "CLIP-I vs IP scale, 95% intervals", "IP scale", "CLIP-I")
    losses = _loss_series(folder, names, seeds)
    draw_lines(losses, str(out / "loss_curves.png"), "held-out loss", "step", "mean over seeds, bars: seed range")
    prompts, _ = embedded_world.held_out_prompts(settings.num_prompts, settings.prompt_seed)

    def first_samples(name: str, scale: float) -> list[list[Image.Image]]:
        samples = folder[name, seeds[0]] / "samples"
        return [[Image.open(samples / f"scale_{scale:g}_prompt_{i}.png")] for i in range(len(prompts))]

    rows = {name: {scale: first_samples(name, scale) for scale in settings.scales} for name in names}
    draw_variant_grid(prompts, rows, str(out / "grid.png"))
    return report


def _loss_series(folder: dict, names: Sequence[str], seeds: Sequence[int]) -> dict:
    """{variant: [(step, mean held-out loss over seeds, min, max)]}."""
    series = {}
    for name in names:
        curves = [dict(read_losses(str(folder[name, s] / "metrics.jsonl"))["held_out"]) for s in seeds]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        series[name] = [
            (step, float(np.mean(v := [c[step] for c in curves])), float(min(v)), float(max(v))) for step in steps
        ]
    return series
