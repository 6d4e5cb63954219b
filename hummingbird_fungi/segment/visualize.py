"""Reports for people: class palette, mask overlays, overlay grids and metric plots (PNG, Agg backend)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

log = logging.getLogger(__name__)

VOID_COLOUR = (255, 255, 255)
ImageLike = Image.Image | np.ndarray


def palette(num_colours: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved ids, distinct for every id) -> (n, 3) uint8."""
    ids = np.arange(num_colours, dtype=np.int64)
    colours = np.zeros((num_colours, 3), dtype=np.int64)
    shift = 7
    while ids.any() and shift >= 0:
        for channel in range(3):
            colours[:, channel] |= ((ids >> channel) & 1) << shift
        ids >>= 3
        shift -= 1
    return colours.astype(np.uint8)


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids (h, w) -> RGB (h, w, 3) uint8; ids outside [0, num_classes) (void) are white."""
    mask = np.asarray(mask).astype(np.int64)
    valid = (mask >= 0) & (mask < num_classes)
    colours = palette(num_classes)[np.where(valid, mask, 0)]  # (h, w, 3)
    colours[~valid] = VOID_COLOUR
    return colours


def boundaries(mask: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another id -> (h, w) bool."""
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    return edge


def overlay(image: ImageLike, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised mask over the image and darken class boundaries -> (h, w, 3) uint8."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image size {rgb.shape[:2]} differs from mask size {mask.shape}")
    out = (1 - alpha) * rgb + alpha * colorize(mask, num_classes)
    out[boundaries(mask)] *= 0.3
    return out.clip(0, 255).astype(np.uint8)


def thumbnail(array: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink an (h, w[, 3]) uint8 array (bilinear) so its long side is at most `max_side`."""
    height, width = array.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return array
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Render a figure with Agg to a PNG file (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    log.info("wrote %s", path)
    return path


def legend_handles(masks: Sequence[np.ndarray], class_names: Sequence[str]) -> list[Patch]:
    """Legend patches of the classes that occur in `masks`."""
    present = set()
    for mask in masks:
        present.update(int(i) for i in np.unique(mask) if 0 <= i < len(class_names))
    colours = palette(len(class_names))
    return [Patch(color=colours[i] / 255, label=class_names[i]) for i in sorted(present)]


def overlay_grid(rows: Sequence[Mapping], path: str | Path, class_names: Sequence[str],
                 max_side: int = 320, title: str | None = None) -> Path:
    """Grid PNG with one row per image: image | prediction overlay | ground-truth overlay (when any).

    Each row is a mapping with `image` (PIL or (h, w, 3) uint8), `pred` (h, w) ids, optional `gt`
    (h, w) ids and optional `name` (row label, e.g. the file stem and its pixel accuracy).
    """
    if not rows:
        raise ValueError("overlay_grid needs at least one row")
    num_classes = len(class_names)
    with_gt = any(row.get("gt") is not None for row in rows)
    columns = ["image", "prediction"] + (["ground truth"] if with_gt else [])
    aspects = [np.shape(row["pred"])[0] / np.shape(row["pred"])[1] for row in rows]  # h / w
    fig = Figure(figsize=(3.2 * len(columns), sum(3.2 * min(a, 1.5) + 0.3 for a in aspects) + 0.8),
                 layout="constrained")
    axes = fig.subplots(len(rows), len(columns), squeeze=False,
                        gridspec_kw={"height_ratios": [min(a, 1.5) for a in aspects]})
    for r, row in enumerate(rows):
        image = np.asarray(row["image"].convert("RGB") if isinstance(row["image"], Image.Image) else row["image"])
        panels = [image, overlay(image, row["pred"], num_classes)]
        if with_gt:
            gt = row.get("gt")
            panels.append(None if gt is None else overlay(image, gt, num_classes))
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is not None:
                ax.imshow(thumbnail(panel, max_side))
            else:
                ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
            if r == 0:
                ax.set_title(columns[c])
        axes[r, 0].set_ylabel(str(row.get("name", r)), fontsize=8)
    masks = [row["pred"] for row in rows] + [row["gt"] for row in rows if row.get("gt") is not None]
    handles = legend_handles(masks, class_names)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_miou_vs_memory(series: Mapping[str, Sequence[tuple[int, float]]], path: str | Path,
                        title: str = "mIoU vs memory size") -> Path:
    """Line plot of mIoU (%) against memory-bank rows (log x axis), one line per series label."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for label, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=label)
        for size, miou in points:
            ax.annotate(f"{100 * miou:.1f}", (size, 100 * miou), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("memory bank rows (patches)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return save_figure(fig, path)


def plot_per_class_iou(per_class_iou: Mapping[str, float | None], path: str | Path,
                       title: str = "per-class IoU") -> Path:
    """Horizontal bars of IoU (%) per class in palette colours; classes absent everywhere marked n/a."""
    names = list(per_class_iou)
    values = [per_class_iou[n] for n in names]
    colours = palette(len(names)) / 255
    fig = Figure(figsize=(6, 0.35 * len(names) + 1.2))
    ax = fig.subplots()
    heights = [0.0 if v is None or math.isnan(v) else 100 * v for v in values]
    ax.barh(range(len(names)), heights, color=colours, edgecolor="black", linewidth=0.5)
    for y, value in enumerate(values):
        text = "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"
        ax.text(heights[y] + 1, y, text, va="center", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title)
    return save_figure(fig, path)
