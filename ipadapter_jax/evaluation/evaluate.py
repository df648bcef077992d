"""One evaluation run of the paper's Table 1 protocol, its summary, and paired comparisons of runs.

A run: for every prompt image (one per distinct image of the annotations, with its first caption), generate
`num_samples` images from the image prompt alone (empty text, IP scale 1, DDIM 50 steps, guidance 7.5 by
default), then score each generated image with the evaluation CLIP: CLIP-I against the prompt image, CLIP-T
against the caption (`ipadapter_jax.evaluation.clip_score`). Prompt image i uses seed `seed + i`, so runs with the same
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
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ipadapter_jax.data.builder import read_annotations
from ipadapter_jax.evaluation.clip_score import CLIPScorer, cosine
from ipadapter_jax.evaluation.results import (
    RESULT_FIELDS,
    RESULTS_NAME,
    RUN_NAME,
    SAMPLES_DIR,
    SHEET_NAME,
    SUMMARY_NAME,
    Row,
    check_or_write_run,
    read_results,
    write_json,
)
from ipadapter_jax.evaluation.statistics import summarize
from ipadapter_jax.models.scale_presets import ScalePreset
from ipadapter_jax.pipelines.images import image_grid


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
    scale: a number or a `ScalePreset` (a named per-layer weight type); height/width None: the base model's size."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scale: float | ScalePreset = 1.0
    num_samples: int = 4
    seed: int = 0
    height: int | None = None
    width: int | None = None
    prompt: str = ""


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
      pipe: an `ipadapter_jax.pipelines.pipeline.IPAdapterPipeline`.
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
    check_or_write_run(out / RUN_NAME, run)
    done = read_results(out / RESULTS_NAME, settings.num_samples)
    pending = [p for p in prompts if p.index not in done]
    timings = collections.Counter()
    running = np.zeros(3)  # sums of clip_i, clip_t and the row count of this session, for the progress bar
    if pending:
        (out / SAMPLES_DIR).mkdir(exist_ok=True)
    with (
        open(out / RESULTS_NAME, "a", newline="") as f,
        tqdm(
            total=len(prompts),
            initial=len(prompts) - len(pending),
            desc=f"eval {out.name}",
            unit="image",
            disable=not progress,
        ) as bar,
    ):
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
            writer.writerows(row.csv_fields() for row in rows)
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
    write_json(out / SUMMARY_NAME, summary)
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
