"""Statistics of evaluation runs: per-image means, bootstrap intervals, paired comparisons of two runs."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ipadapter_jax.evaluation.clip_score import clipscore
from ipadapter_jax.evaluation.results import PAIRING_KEYS, RESULTS_NAME, Row, read_results, read_run, write_json


def bootstrap_interval(
    values: np.ndarray, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (N,): resample N values with replacement."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (num_resamples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def per_image_metrics(rows: Iterable[Row]) -> dict[int, dict[str, float]]:
    """index -> the mean over its samples of clip_i, clip_t, clip_t_x100 and clipscore (2.5 * max(cos, 0),
    taken per sample before averaging, as CLIPScore is defined per image-caption pair)."""
    grouped: dict[int, list[Row]] = collections.defaultdict(list)
    for row in rows:
        grouped[row.index].append(row)
    out = {}
    for index, group in grouped.items():
        clip_t = np.array([r.clip_t for r in group])
        out[index] = {
            "clip_i": float(np.mean([r.clip_i for r in group])),
            "clip_t": float(clip_t.mean()),
            "clip_t_x100": float(100 * clip_t.mean()),
            "clipscore": float(clipscore(clip_t).mean()),
        }
    return out


def summarize(rows: Sequence[Row], num_resamples: int = 1000) -> dict:
    """Means over prompt images (each the mean of its samples) with 95% bootstrap intervals over prompt images
    (samples of one prompt share its image, so they are not independent)."""
    per_image = per_image_metrics(rows)
    metrics = {}
    for name in ("clip_i", "clip_t", "clip_t_x100", "clipscore"):
        values = np.array([m[name] for m in per_image.values()])
        metrics[name] = (
            {"mean": float(values.mean()), "ci95": list(bootstrap_interval(values, num_resamples))}
            if len(values)
            else {"mean": None, "ci95": None}
        )
    return {"images": len(per_image), "samples": len(rows), "metrics": metrics}


def compare_runs(baseline: str | os.PathLike, other: str | os.PathLike, num_resamples: int = 1000) -> dict:
    """Paired comparison of two run folders on their common prompt images: per image, the mean over samples of
    `other` minus that of `baseline`; the mean difference with its 95% bootstrap interval (over images) and the
    fraction of images where `other` is higher.

    Raises:
      ValueError: the runs cannot be paired (different annotations, image root, eval CLIP, seed, sample count
        or size: see `PAIRING_KEYS`) or share no scored prompt image.
    """
    runs = [read_run(Path(folder)) for folder in (baseline, other)]
    differ = [key for key in PAIRING_KEYS if runs[0][key] != runs[1][key]]
    if differ:
        raise ValueError(
            f"{baseline} and {other} are not paired runs: they differ in "
            + ", ".join(f"{key} ({runs[0][key]!r} vs {runs[1][key]!r})" for key in differ)
        )
    per_image = []
    for folder, run in zip((baseline, other), runs):
        results = read_results(Path(folder) / RESULTS_NAME, run["num_samples"])
        per_image.append(per_image_metrics(row for rows in results.values() for row in rows))
    common = sorted(set(per_image[0]) & set(per_image[1]))
    if not common:
        raise ValueError(f"{baseline} and {other} have no scored prompt image in common")
    metrics = {}
    for name in ("clip_i", "clip_t", "clip_t_x100", "clipscore"):
        a = np.array([per_image[0][i][name] for i in common])
        b = np.array([per_image[1][i][name] for i in common])
        metrics[name] = {
            "baseline": float(a.mean()),
            "other": float(b.mean()),
            "difference": float((b - a).mean()),
            "ci95": list(bootstrap_interval(b - a, num_resamples)),
            "other_higher_fraction": float(np.mean(b > a)),
        }
    return {
        "baseline": str(baseline),
        "other": str(other),
        "paired_images": len(common),
        "baseline_run": runs[0],
        "other_run": runs[1],
        "metrics": metrics,
    }


def write_comparison(
    path: str | os.PathLike, baseline: str | os.PathLike, others: Sequence[str | os.PathLike], num_resamples: int = 1000
) -> dict:
    """`compare_runs(baseline, other)` for every other run, written to `path` as {"comparisons": [...]}."""
    result = {"comparisons": [compare_runs(baseline, other, num_resamples) for other in others]}
    write_json(Path(path), result)
    return result
