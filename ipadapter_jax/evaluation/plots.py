"""Pictures for reports: a training run's loss curves and a grid of samples per image prompt and IP scale (PIL only).

Used by the demo (`training/demo.py`); the inputs are the training script's metrics.jsonl and plain lists of
PIL images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

Samples = dict[float, list[list[Image.Image]]]  # {scale: [the samples of image prompt i]}


def read_losses(metrics_file: str) -> dict[str, list[tuple[int, float]]]:
    """The training script's metrics.jsonl -> {"train": [(step, mean loss of the logging interval)],
    "held_out": [(step, loss of the held-out batch with fixed noise and timesteps)]}."""
    with open(metrics_file) as f:
        records = [json.loads(line) for line in f]
    return {
        "train": [(m["step"], m["loss"]) for m in records if "loss" in m],
        "held_out": [(m["step"], m["eval_loss"]) for m in records if "eval_loss" in m],
    }


def draw_loss_curve(losses: dict[str, list[tuple[int, float]]], path: str) -> None:
    """Both curves of `read_losses` against step, drawn with PIL. The training loss is noisy by nature (random
    timesteps and noise per batch); the held-out batch's is not, so it shows the trend."""
    width, height, left, right, top, bottom = 760, 440, 70, 20, 60, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(13)
    colours = {"train": (150, 180, 230), "held_out": (200, 40, 40)}
    labels = {"train": "training loss (mean per logging interval)", "held_out": "held-out batch, fixed noise"}
    draw.text((left, 10), "IP-Adapter training: epsilon-prediction MSE", fill="black", font=font)
    for k, name in enumerate(labels):
        x = left + k * 330
        draw.line([x, 40, x + 24, 40], fill=colours[name], width=3)
        draw.text((x + 30, 33), labels[name], fill="black", font=font)
    values = [v for points in losses.values() for _, v in points]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    low, high = low - pad, high + pad
    x_max = max(step for points in losses.values() for step, _ in points)

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (width - left - right) * step / x_max
        return x, top + (height - top - bottom) * (high - loss) / (high - low)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        value = low + (high - low) * k / 4
        _, y = xy(0, value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((8, y - 7), f"{value:.4f}", fill="black", font=font)
        step = x_max * k / 4
        x, _ = xy(step, low)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{step:.0f}", fill="black", font=font)
    draw.text((width // 2 - 15, height - 20), "step", fill="black", font=font)
    for name in ("train", "held_out"):  # held-out on top
        points = [xy(step, value) for step, value in losses[name]]
        if len(points) > 1:
            draw.line(points, fill=colours[name], width=2)
        for x, y in points if name == "held_out" else ():
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[name])
    image.save(path)


def draw_grid(prompts: Sequence[Image.Image], samples: Samples, scores: dict, path: str, cell: int = 128) -> None:
    """Rows: image prompts. Columns: the prompt | its samples at each scale (same noise across scales)."""
    scales = list(samples)
    per_scale = len(samples[scales[0]][0])
    gap, header = 12, 44
    width = cell + len(scales) * (gap + per_scale * cell)
    height = header + len(prompts) * cell
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(14)
    draw.text((8, 6), "image prompt", fill="black", font=font)
    for j, scale in enumerate(scales):
        x = cell + j * (gap + per_scale * cell) + gap
        draw.text((x + 4, 6), f"scale {scale:g}", fill="black", font=font)
        draw.text((x + 4, 24), f"CLIP-I {scores['mean'][str(scale)]:.3f}", fill="black", font=font)
    for i, prompt in enumerate(prompts):
        y = header + i * cell
        grid.paste(prompt.resize((cell, cell), Image.Resampling.NEAREST), (0, y))
        for j, scale in enumerate(scales):
            x = cell + j * (gap + per_scale * cell) + gap
            for k, image in enumerate(samples[scale][i]):
                grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x + k * cell, y))
    grid.save(path)
