"""Pictures for reports: a training run's loss curves and a grid of samples per image prompt and IP scale (PIL only);
for ablations, lines with interval bars (CLIP-I vs scale, loss curves per variant) and a grid of samples per variant.

Used by the demo (`training/demo.py`) and `ipadapter-jax ablate`; the inputs are the training script's metrics.jsonl
and plain lists of PIL images.
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


Series = dict[str, list[tuple[float, float, float, float]]]  # {label: [(x, y, low, high)]} (low = high = y: no bar)
PALETTE = ((200, 40, 40), (40, 90, 200), (40, 150, 60), (220, 140, 20), (140, 50, 170), (20, 150, 160), (90, 90, 90))


def draw_lines(series: Series, path: str, title: str, x_label: str, y_label: str) -> None:
    """One line per label (points with vertical interval bars where low < high), a legend, axes with ticks."""
    width, height, left, right, top, bottom = 760, 460, 70, 20, 40 + 18 * len(series), 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(13)
    draw.text((left, 8), f"{title} ({y_label})", fill="black", font=font)
    for k, label in enumerate(series):
        y = 32 + 18 * k
        draw.line([left, y, left + 24, y], fill=PALETTE[k % len(PALETTE)], width=3)
        draw.text((left + 30, y - 7), label, fill="black", font=font)
    points = [p for values in series.values() for p in values]
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[2] for p in points), max(p[3] for p in points)
    pad = 0.05 * (y_high - y_low or 1.0)
    y_low, y_high = y_low - pad, y_high + pad
    x_span = x_high - x_low or 1.0

    def xy(x: float, y: float) -> tuple[float, float]:
        return (
            left + (width - left - right) * (x - x_low) / x_span,
            top + (height - top - bottom) * (y_high - y) / (y_high - y_low),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(5):
        value, x_value = y_low + (y_high - y_low) * k / 4, x_low + x_span * k / 4
        _, y = xy(x_low, value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((8, y - 7), f"{value:.3f}", fill="black", font=font)
        x, _ = xy(x_value, y_low)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{x_value:g}", fill="black", font=font)
    draw.text((width // 2 - 15, height - 20), x_label, fill="black", font=font)
    for k, values in enumerate(series.values()):
        colour = PALETTE[k % len(PALETTE)]
        line = [xy(x, y) for x, y, _, _ in values]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, _, low, high in values:
            if high > low:
                (px, p_low), (_, p_high) = xy(x, low), xy(x, high)
                draw.line([px, p_low, px, p_high], fill=colour, width=1)
                draw.line([px - 4, p_low, px + 4, p_low], fill=colour)
                draw.line([px - 4, p_high, px + 4, p_high], fill=colour)
    image.save(path)


def draw_variant_grid(prompts: Sequence[Image.Image], rows: dict[str, Samples], path: str, cell: int = 96) -> None:
    """Top row: the image prompts. Then per variant and scale a row of samples (the first of each prompt)."""
    label_width, header = 170, 20
    labels = [(variant, scale) for variant, samples in rows.items() for scale in samples]
    grid = Image.new("RGB", (label_width + len(prompts) * cell, header + (1 + len(labels)) * cell), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(13)
    draw.text((8, 4), "samples: first seed, first sample per prompt", fill="black", font=font)
    draw.text((8, header + cell // 2), "image prompt", fill="black", font=font)
    for i, prompt in enumerate(prompts):
        grid.paste(prompt.resize((cell, cell), Image.Resampling.NEAREST), (label_width + i * cell, header))
    for row, (variant, scale) in enumerate(labels, start=1):
        y = header + row * cell
        draw.text((8, y + cell // 2 - 8), f"{variant}\nscale {scale:g}", fill="black", font=font)
        for i, images in enumerate(rows[variant][scale]):
            grid.paste(images[0].resize((cell, cell), Image.Resampling.NEAREST), (label_width + i * cell, y))
    grid.save(path)
