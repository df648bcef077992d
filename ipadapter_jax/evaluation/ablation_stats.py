"""Statistics of an ablation (`ipadapter-jax ablate`): text controllability, per-variant means and paired
differences between variants, each with a 95% bootstrap interval over (seed, prompt) units.

A run's scores are {metric: {scale: [value of prompt i]}} (each value the mean over that prompt's samples);
an ablation's are {variant: {seed: scores}}. The units of the intervals are the (seed, image prompt) pairs: samples
of one prompt share its image and noise, so they are averaged first. A paired difference compares two variants on
the same seeds and prompts (the same noise, the same data order), so the prompt's own difficulty cancels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ipadapter_jax.evaluation.clip_score import cosine
from ipadapter_jax.evaluation.statistics import bootstrap_interval

# CLIP-I: sample vs image prompt (image-only generation). CLIP-T: sample vs the text prompt it was generated with
# (image prompt + edited caption). control_hit / control_margin: `controllability` of those samples.
METRICS = ("clip_i", "clip_t", "control_hit", "control_margin")
RunScores = Mapping[str, Mapping[str, Sequence[float]]]  # {metric: {scale (str): [per prompt]}}


def controllability(samples: np.ndarray, edited: np.ndarray, original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Does the sample follow the text that changed one attribute of the image's caption?

    samples (N, D): eval-CLIP image embeddings of samples generated from an image prompt + the edited caption;
    edited, original (N, D) or (1, D): text embeddings of the edited caption and of the image's own caption.
    -> (hit (N,): 1.0 where the sample is closer (cosine) to the edited caption than to the original, else 0.0;
    margin (N,): cos(sample, edited) - cos(sample, original)).
    """
    margin = cosine(samples, edited).astype(np.float64) - cosine(samples, original).astype(np.float64)
    return (margin > 0).astype(np.float64), margin


def _units(runs: Mapping[int, RunScores], metric: str, scale: str) -> dict[tuple[int, int], float]:
    """{(seed, prompt index): value} of one variant."""
    return {(seed, i): float(v) for seed, scores in runs.items() for i, v in enumerate(scores[metric][scale])}


def summarize_variants(
    scores: Mapping[str, Mapping[int, RunScores]], scales: Sequence[str], num_resamples: int = 1000
) -> dict:
    """{variant: {metric: {scale: {"mean", "ci95": [low, high], "n"}}}}: the mean over (seed, prompt) units with
    its percentile bootstrap interval (`statistics.bootstrap_interval`)."""
    table: dict = {}
    for variant, runs in scores.items():
        table[variant] = {}
        for metric in METRICS:
            table[variant][metric] = {}
            for scale in scales:
                values = np.array(list(_units(runs, metric, scale).values()))
                table[variant][metric][scale] = {
                    "mean": float(values.mean()),
                    "ci95": list(bootstrap_interval(values, num_resamples)),
                    "n": len(values),
                }
    return table


def paired_difference(
    scores: Mapping[str, Mapping[int, RunScores]],
    baseline: str,
    other: str,
    scales: Sequence[str],
    num_resamples: int = 1000,
) -> dict:
    """`other` - `baseline` on their common (seed, prompt) units, per metric and scale: {"difference" (mean),
    "ci95", "other_higher_fraction", "n"}.

    Raises:
      ValueError: the two variants share no (seed, prompt) unit.
    """
    out: dict = {"baseline": baseline, "other": other, "metrics": {}}
    for metric in METRICS:
        out["metrics"][metric] = {}
        for scale in scales:
            a, b = _units(scores[baseline], metric, scale), _units(scores[other], metric, scale)
            common = sorted(set(a) & set(b))
            if not common:
                raise ValueError(f"variants {baseline!r} and {other!r} have no (seed, prompt) in common to pair")
            differences = np.array([b[k] - a[k] for k in common])
            out["metrics"][metric][scale] = {
                "difference": float(differences.mean()),
                "ci95": list(bootstrap_interval(differences, num_resamples)),
                "other_higher_fraction": float(np.mean(differences > 0)),
                "n": len(common),
            }
    return out


def report_markdown(report: Mapping) -> str:
    """The ablation's report.md: settings, the per-variant table, the paired differences vs the first variant."""
    scales, settings = report["scales"], report["settings"]
    lines = [
        "# Ablation report",
        "",
        f"{len(report['variants'])} variants x seeds {report['seeds']}, {settings['steps']} training steps each "
        f"(same data and order), {settings['num_prompts']} held-out image prompts x "
        f"{settings['samples_per_prompt']} samples, {settings['inference_steps']} DDIM steps. Means over "
        "(seed, prompt) units with 95% bootstrap intervals.",
        "",
        "- clip_i: cos(sample, image prompt), image-only generation",
        "- clip_t: cos(sample, text prompt), generated from the image prompt + its caption with one attribute changed",
        "- control_hit: fraction of those samples closer to the changed caption than to the original; "
        "control_margin: the mean cosine difference",
        "",
        "## Variants",
        "",
        "| variant | overrides | metric | " + " | ".join(f"scale {s}" for s in scales) + " |",
        "|---|---|---|" + "---|" * len(scales),
    ]
    for variant in report["variants"]:
        name, overrides = variant["name"], " ".join(variant["overrides"]) or "(preset)"
        for metric in METRICS:
            cells = [_cell(report["table"][name][metric][s], "mean") for s in scales]
            lines.append(f"| {name} | {overrides} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences (other - baseline; same seeds and prompts)", ""]
    lines += ["| other - baseline | metric | " + " | ".join(f"scale {s}" for s in scales) + " |"]
    lines += ["|---|---|" + "---|" * len(scales)]
    for pair in report["differences"]:
        for metric in METRICS:
            cells = [_cell(pair["metrics"][metric][s], "difference") for s in scales]
            lines.append(f"| {pair['other']} - {pair['baseline']} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| variant | seed | train s | eval s | this invocation |", "|---|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(
            f"| {run['variant']} | {run['seed']} | {run['train_seconds']:.0f} | {run['eval_seconds']:.0f} "
            f"| {run['status']} |"
        )
    return "\n".join(lines) + "\n"


def _cell(entry: Mapping, key: str) -> str:
    low, high = entry["ci95"]
    return (
        f"{entry[key]:+.3f} [{low:+.3f}, {high:+.3f}]"
        if key == "difference"
        else f"{entry[key]:.3f} [{low:.3f}, {high:.3f}]"
    )
