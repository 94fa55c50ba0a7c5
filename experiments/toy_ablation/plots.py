"""Read the toy ablation's runs back and draw its plots (used by notebooks/toy_ablation.ipynb).

Plain PIL drawing (no plotting library in the project's dependencies): :func:`line_chart` draws curves with a band
(min-max over seeds), axes, ticks and a legend; :func:`samples_grid` puts real renders, the teacher's and each
variant's images for the same prompts side by side.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


# ---- reading ------------------------------------------------------------------------------------------------
def load(out: str | Path) -> dict:
    """``{"settings", "runs": {(variant, seed): row of runs.csv}, "metrics": {(variant, seed): {column: [(step, v)]}}}``."""
    out = Path(out)
    settings = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    with (out / "runs.csv").open(newline="", encoding="utf-8") as f:
        runs = {(r["variant"], int(r["seed"])): r for r in csv.DictReader(f)}
    metrics = {}
    for key, run in sorted(runs.items()):
        path = Path(run["run_dir"]) / "csv" / "metrics.csv"
        if path.is_file():
            metrics[key] = read_metrics(path)
    return {"out": out, "settings": settings, "runs": runs, "metrics": metrics}


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A Lightning CSVLogger metrics.csv as ``{column: [(step, value), ...]}`` (empty cells skipped)."""
    columns: dict[str, list[tuple[int, float]]] = {}
    with Path(path).open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for name, value in row.items():
                if name == "step" or value in (None, ""):
                    continue
                try:
                    columns.setdefault(name, []).append((int(float(step)), float(value)))
                except ValueError:
                    continue
    return columns


def curve(ablation: dict, variant: str, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean, min, max) of ``column`` over the variant's seeds, on the steps every seed logged."""
    series = [dict(m[column]) for (v, _), m in ablation["metrics"].items() if v == variant and column in m]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:
        return None
    values = np.array([[s[t] for t in steps] for s in series])
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def layer_columns(ablation: dict, variant: str, term: str = "feat_kd") -> list[str]:
    """The per-layer columns ``train/<term>/<layer>`` the variant's runs logged."""
    found = {c for (v, _), m in ablation["metrics"].items() if v == variant for c in m}
    return sorted(c for c in found if c.startswith(f"train/{term}/"))


# ---- drawing ------------------------------------------------------------------------------------------------
def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(
    series: dict[str, tuple],
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (640, 400),
) -> Image.Image:
    """``series``: name -> (xs, ys) or (xs, ys, lo, hi) (a band). Returns the chart as an RGB image."""
    width, height = size
    left, right, top, bottom = 64, 16, 28, 44
    font, small = _font(13), _font(11)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    tf = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    xs_all = [float(x) for s in series.values() for x in s[0]]
    ys_all = [tf(float(y)) for s in series.values() for part in s[1:] for y in part]
    if not xs_all:
        draw.text((left, height // 2), "no data", fill="black", font=font)
        return image
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (
            left + (float(x) - x0) / (x1 - x0) * (width - left - right),
            top + (1 - (tf(float(y)) - y0) / (y1 - y0)) * (height - top - bottom),
        )

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for t in _ticks(x0, x1):
        x, _ = px(t, 10**y0 if log_y else y0)
        draw.line((x, height - bottom, x, height - bottom + 4), fill="black")
        draw.text((x - 10, height - bottom + 6), f"{t:g}", fill="black", font=small)
    for t in _ticks(y0, y1):
        value = 10**t if log_y else t
        _, y = px(x0, value)
        draw.line((left - 4, y, left, y), fill="black")
        draw.line((left, y, width - right, y), fill=(230, 230, 230))
        draw.text((4, y - 7), f"{value:.3g}", fill="black", font=small)
    draw.text((left, 6), title, fill="black", font=font)
    draw.text(((width - left) // 2, height - 18), xlabel, fill="black", font=small)
    if ylabel:
        draw.text((left + 4, top + 2), ylabel + (" (log)" if log_y else ""), fill=(90, 90, 90), font=small)
    for i, s in enumerate(series.values()):
        colour = PALETTE[i % len(PALETTE)]
        xs = s[0]
        if len(s) == 4 and len(xs) > 1:
            band = [px(x, y) for x, y in zip(xs, s[3])] + [px(x, y) for x, y in zip(xs[::-1], s[2][::-1])]
            tint = tuple(int(c + (255 - c) * 0.8) for c in colour)
            draw.polygon(band, fill=tint)
    for i, (name, s) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = [px(x, y) for x, y in zip(s[0], s[1])]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points if len(points) <= 60 else []:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.line(
            (width - right - 190, top + 10 + 15 * i, width - right - 170, top + 10 + 15 * i), fill=colour, width=3
        )
        draw.text((width - right - 165, top + 3 + 15 * i), name[:30], fill="black", font=small)
    return image


def side_by_side(images: list[Image.Image], cols: int = 2) -> Image.Image:
    """Charts in a grid, ``cols`` per row."""
    if not images:
        return Image.new("RGB", (1, 1), "white")
    w, h = max(i.width for i in images), max(i.height for i in images)
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (w * min(cols, len(images)), h * rows), "white")
    for k, image in enumerate(images):
        grid.paste(image, ((k % cols) * w, (k // cols) * h))
    return grid


def samples_grid(ablation: dict, num: int = 6, seed: int | None = None, scale: int = 3) -> tuple[Image.Image, list]:
    """Rows: the first ``num`` evaluation prompts; columns: real render, teacher, then each variant (its first
    seed, or ``seed``). Returns (image, column names)."""
    import csv as _csv

    from bksdm_lab.world import judge as J
    from bksdm_lab.world import scenes

    out = ablation["out"]
    teacher_dir = out / "teacher_eval"
    with (teacher_dir / "prompts.csv").open(newline="", encoding="utf-8") as f:
        rows = list(_csv.DictReader(f))[:num]
    prompts = [r["text"] for r in rows]
    columns = [("real render", None), ("teacher", teacher_dir)]
    for variant in ablation["settings"]["variants"]:
        seeds = sorted(s for v, s in ablation["runs"] if v == variant)
        if not seeds:
            continue
        pick = seed if seed in seeds else seeds[0]
        folder = Path(ablation["runs"][(variant, pick)]["run_dir"]) / "world_eval"
        if (folder / "prompts.csv").is_file():
            columns.append((f"{variant} s{pick}", folder))
    real = J.render_scenes([scenes.parse_caption(p) for p in prompts], 32, seed=7)
    side = 32 * scale
    label_h, caption_w = 18, 370
    font = _font(11)
    grid = Image.new("RGB", (caption_w + side * len(columns), label_h + side * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, _) in enumerate(columns):
        draw.text((caption_w + c * side + 2, 3), name[:16], fill="black", font=font)
    for r, (row, prompt) in enumerate(zip(rows, prompts)):
        draw.text((4, label_h + r * side + side // 2 - 7), prompt[:66], fill="black", font=font)
        for c, (_, folder) in enumerate(columns):
            if folder is None:
                tile = Image.fromarray(real[r].permute(1, 2, 0).numpy())
            else:
                with Image.open(folder / "images" / row["file_name"]) as im:
                    tile = im.convert("RGB")
            grid.paste(tile.resize((side, side), Image.Resampling.NEAREST), (caption_w + c * side, label_h + r * side))
    return grid, [name for name, _ in columns]
