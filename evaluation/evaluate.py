"""One evaluation run of the paper's Table 1 protocol, its summary, and paired comparisons of runs.

A run: for every prompt image (one per distinct image of the annotations, with its first caption), generate
`num_samples` images from the image prompt alone (empty text, IP scale 1, DDIM 50 steps, guidance 7.5 by
default), then score each generated image with the evaluation CLIP: CLIP-I against the prompt image, CLIP-T
against the caption (`evaluation.clip_score`). Prompt image i uses seed `seed + i`, so runs with the same
annotations and seed see the same initial noise and can be compared pairwise.

Files in the output folder:

  run.json           what defines the run (models, data, sampling settings); a resumed run must match it
  results.csv        one row per generated image: index, image_file, caption, sample, seed, clip_i, clip_t
  summary.json       means with 95% bootstrap intervals (resampling prompt images), counts, timings
  samples/           generated PNGs of the first `contact_sheet` prompts (of all prompts with save_images)
  contact_sheet.png  one row per prompt of the first `contact_sheet`: the prompt image, then its samples

Resuming: rows are appended and flushed after every batch of prompt images; a rerun reads results.csv, drops a
torn last line or an incomplete prompt, and generates only the prompts not yet scored.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from conversion.atomic_write import atomic_output
from evaluation.clip_score import CLIPScorer, clipscore, cosine
from ipadapter_jax.pipeline import image_grid
from training.data_build import read_annotations

RUN_NAME = "run.json"
RESULTS_NAME = "results.csv"
SUMMARY_NAME = "summary.json"
SHEET_NAME = "contact_sheet.png"
SAMPLES_DIR = "samples"
RESULT_FIELDS = ("index", "image_file", "caption", "sample", "seed", "clip_i", "clip_t")
# What must agree between two runs for their rows to be paired: the same prompt images, noise and scorer.
PAIRING_KEYS = ("annotations", "image_root", "eval_clip", "seed", "num_samples", "height", "width")


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """One prompt image: its position among the distinct images of the annotations (the seed offset), its path
    relative to the image root, and its caption (the first one in annotation order)."""

    index: int
    image_file: str
    caption: str


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Generation settings; the defaults are the paper's (image-only prompt: empty text, scale 1.0).
    height/width None: the base model's default size."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scale: float = 1.0
    num_samples: int = 4
    seed: int = 0
    height: int | None = None
    width: int | None = None
    prompt: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
    """One scored generated image (a line of results.csv)."""

    index: int
    image_file: str
    caption: str
    sample: int
    seed: int
    clip_i: float
    clip_t: float


def eval_prompts(annotations: str | os.PathLike, limit: int | None = None) -> tuple[list[EvalPrompt], int]:
    """The distinct prompt images of a COCO captions file or a training JSON list, in annotation order.

    An image with several captions (COCO has ~5) is one prompt with its first usable caption. Entries without
    a string image path or with an empty caption are skipped. Returns (the first `limit` prompts, the number
    of annotation entries skipped).
    """
    captions: dict[str, str] = {}
    skipped = 0
    for entry in read_annotations(annotations):
        usable = (
            entry.problem is None
            and isinstance(entry.image_file, str)
            and isinstance(entry.text, str)
            and entry.text.strip()
        )
        if not usable:
            skipped += 1
        elif entry.image_file not in captions:
            captions[entry.image_file] = entry.text
    prompts = [EvalPrompt(i, image_file, text) for i, (image_file, text) in enumerate(captions.items())]
    return (prompts if limit is None else prompts[:limit]), skipped


def run_evaluation(
    pipe: Any,
    scorer: CLIPScorer,
    prompts: Sequence[EvalPrompt],
    image_root: str | os.PathLike,
    settings: SamplingSettings,
    out_dir: str | os.PathLike,
    *,
    identity: Mapping[str, Any],
    batch_images: int = 8,
    contact_sheet: int = 8,
    save_images: bool = False,
    num_resamples: int = 1000,
    progress: bool = True,
) -> dict:
    """Generates and scores every prompt not yet in `out_dir/results.csv`, then writes the summary and sheet.

    Args:
      pipe: an `ipadapter_jax.pipeline.IPAdapterPipeline`.
      scorer: the evaluation CLIP (`CLIPScorer`); one call scores `batch_images` prompts' images.
      identity: the models and data that define the run (paths etc., JSON-able); stored in run.json with the
        settings and compared on resume.
      batch_images: prompt images per generation call (batch_images x num_samples images, sharded over the
        pipeline's devices; each prompt's noise is the one a call for it alone gets), scoring batch and
        results.csv flush.
      contact_sheet: the first K prompts shown in contact_sheet.png (their samples are kept in samples/).
      save_images: keep every generated image in samples/ (`{index:05d}_{sample}.png`).
      num_resamples: bootstrap resamples of the summary's intervals.
    Returns:
      The summary (also written to summary.json).
    Raises:
      ValueError: `out_dir` holds a run with other settings. OSError: a prompt image cannot be read.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = {"identity": dict(identity), "settings": dataclasses.asdict(settings)}
    _check_or_write_run(out / RUN_NAME, run)
    done = read_results(out / RESULTS_NAME, settings.num_samples)
    pending = [p for p in prompts if p.index not in done]
    timings = collections.Counter()
    running = np.zeros(3)  # sums of clip_i, clip_t and the row count of this session, for the progress bar
    if pending:
        (out / SAMPLES_DIR).mkdir(exist_ok=True)
    with open(out / RESULTS_NAME, "a", newline="") as f, tqdm(
        total=len(prompts), initial=len(prompts) - len(pending), desc=f"eval {out.name}", unit="image",
        disable=not progress,
    ) as bar:
        writer = csv.writer(f)
        if f.tell() == 0:
            writer.writerow(RESULT_FIELDS)
        for start in range(0, len(pending), batch_images):
            chunk = pending[start : start + batch_images]
            references = [_open_rgb(Path(image_root) / p.image_file) for p in chunk]
            result = _generate(pipe, references, settings, [settings.seed + p.index for p in chunk])
            timings["compile_s"] += result.timings["compile_s"]
            timings["generate_s"] += result.timings["prepare_s"] + result.timings["sample_s"]
            per_prompt = settings.num_samples
            samples = [result.images[i * per_prompt : (i + 1) * per_prompt] for i in range(len(chunk))]
            begin = time.perf_counter()
            rows = score_prompts(scorer, chunk, references, samples, settings.seed)
            timings["score_s"] += time.perf_counter() - begin
            writer.writerows(_csv_fields(row) for row in rows)
            f.flush()
            os.fsync(f.fileno())  # a crash loses at most the batch being written
            for prompt, images in zip(chunk, samples):
                if save_images or prompt.index < contact_sheet:
                    for s, image in enumerate(images):
                        image.save(out / SAMPLES_DIR / f"{prompt.index:05d}_{s}.png")
                done[prompt.index] = [row for row in rows if row.index == prompt.index]
            running += np.array([[r.clip_i, r.clip_t, 1.0] for r in rows]).sum(axis=0)
            bar.update(len(chunk))
            bar.set_postfix(clip_i=f"{running[0] / running[2]:.3f}", clip_t=f"{running[1] / running[2]:.3f}")

    rows = [row for p in prompts if p.index in done for row in done[p.index]]
    summary = {
        **summarize(rows, num_resamples=num_resamples),
        "prompts_requested": len(prompts),
        "prompts_scored_this_run": len(pending),
        **run,
        "timings": {key: round(value, 3) for key, value in timings.items()},
    }
    _write_json(out / SUMMARY_NAME, summary)
    _write_contact_sheet(out, prompts[:contact_sheet], settings.num_samples, image_root)
    return summary


def score_prompts(
    scorer: CLIPScorer,
    prompts: Sequence[EvalPrompt],
    references: Sequence[Image.Image],
    samples: Sequence[Sequence[Image.Image]],
    seed: int,
) -> list[Row]:
    """CLIP-I and CLIP-T of every generated image: P prompts, their reference images and P lists of S samples
    -> P * S rows. All images go through the CLIP vision tower in one batched call, all captions in another."""
    flat = [image for images in samples for image in images]
    embeddings = scorer.image_embeddings(list(references) + flat)
    reference_emb, sample_emb = embeddings[: len(references)], embeddings[len(references) :]
    text_emb = scorer.text_embeddings([p.caption for p in prompts])
    owner = np.repeat(np.arange(len(prompts)), [len(images) for images in samples])  # prompt of each sample
    clip_i = cosine(sample_emb, reference_emb[owner])
    clip_t = cosine(sample_emb, text_emb[owner])
    sample_ids = [s for images in samples for s in range(len(images))]
    return [
        Row(p.index, p.image_file, p.caption, s, seed + p.index, float(ci), float(ct))
        for p, s, ci, ct in zip((prompts[j] for j in owner), sample_ids, clip_i, clip_t)
    ]


def read_results(path: Path, num_samples: int) -> dict[int, list[Row]]:
    """The complete prompts of a results.csv: index -> its `num_samples` rows. A torn last line (no newline:
    the writer was killed mid-line) and prompts with missing or unreadable rows are dropped, and the file is
    rewritten without them so that appending continues from whole prompts."""
    if not path.is_file():
        return {}
    text = path.read_text()
    kept_text = text[: text.rfind("\n") + 1]
    groups: dict[int, list[Row]] = collections.defaultdict(list)
    broken = set()
    for record in csv.DictReader(kept_text.splitlines(keepends=True)):
        try:
            row = Row(int(record["index"]), record["image_file"], record["caption"], int(record["sample"]),
                      int(record["seed"]), float(record["clip_i"]), float(record["clip_t"]))
        except (TypeError, ValueError, KeyError):
            broken.add(record.get("index"))
            continue
        groups[row.index].append(row)
    complete = {
        index: sorted(rows, key=lambda r: r.sample)
        for index, rows in groups.items()
        if str(index) not in broken and sorted(r.sample for r in rows) == list(range(num_samples))
    }
    if len(complete) != len(groups) or broken or kept_text != text:
        _write_rows(path, [row for index in sorted(complete) for row in complete[index]])
    return complete


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
            if len(values) else {"mean": None, "ci95": None}
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
    runs = [_read_run(Path(folder)) for folder in (baseline, other)]
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


def write_comparison(path: str | os.PathLike, baseline: str | os.PathLike, others: Sequence[str | os.PathLike],
                     num_resamples: int = 1000) -> dict:
    """`compare_runs(baseline, other)` for every other run, written to `path` as {"comparisons": [...]}."""
    result = {"comparisons": [compare_runs(baseline, other, num_resamples) for other in others]}
    _write_json(Path(path), result)
    return result


def _generate(pipe: Any, references: Sequence[Image.Image], settings: SamplingSettings, seeds: Sequence[int]) -> Any:
    """Samples for several prompt images in one call: prompt image i with seed seeds[i]."""
    return pipe(
        list(references),
        per_prompt_images=True,
        prompt=[settings.prompt] * len(references),
        scale=settings.scale,
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.num_inference_steps,
        height=settings.height,
        width=settings.width,
        seed=list(seeds),
        num_images_per_prompt=settings.num_samples,
    )


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _check_or_write_run(path: Path, run: dict) -> None:
    """First run: writes run.json. Later runs: refuse to mix results of different settings into one folder."""
    if not path.is_file():
        _write_json(path, run)
        return
    stored = json.loads(path.read_text())
    differences = [
        f"{section}.{key}: {stored.get(section, {}).get(key)!r} -> {value!r}"
        for section in ("identity", "settings")
        for key, value in json.loads(json.dumps(run[section])).items()
        if stored.get(section, {}).get(key) != value
    ]
    if differences:
        raise ValueError(
            f"{path.parent} holds a run with other settings ({'; '.join(differences)}): use another output folder"
        )


def _read_run(folder: Path) -> dict:
    """run.json flattened to the keys `PAIRING_KEYS` name (and every other identity/settings key)."""
    path = folder / RUN_NAME
    if not path.is_file():
        raise ValueError(f"{folder}: not an evaluation run folder (no {RUN_NAME})")
    stored = json.loads(path.read_text())
    return {**stored["identity"], **stored["settings"]}


def _write_rows(path: Path, rows: Sequence[Row]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RESULT_FIELDS)
        writer.writerows(_csv_fields(row) for row in rows)


def _csv_fields(row: Row) -> list:
    return [row.index, row.image_file, row.caption, row.sample, row.seed, f"{row.clip_i:.8f}", f"{row.clip_t:.8f}"]


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def _write_contact_sheet(
    out: Path, prompts: Sequence[EvalPrompt], num_samples: int, image_root: str | os.PathLike
) -> None:
    """Rows of [prompt image, sample 0, ..., sample S-1] for the prompts whose samples are all in samples/;
    the prompt image is resized to the samples' size."""
    cells = []
    for prompt in prompts:
        files = [out / SAMPLES_DIR / f"{prompt.index:05d}_{s}.png" for s in range(num_samples)]
        if not all(f.is_file() for f in files):
            continue
        samples = [_open_rgb(f) for f in files]
        cells.append(_open_rgb(Path(image_root) / prompt.image_file).resize(samples[0].size, Image.Resampling.BICUBIC))
        cells.extend(samples)
    if cells:
        image_grid(cells, cols=num_samples + 1).save(out / SHEET_NAME)
