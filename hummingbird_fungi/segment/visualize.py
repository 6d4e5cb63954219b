"""Reports for people: class palette, palette PNG masks, overlays with a legend, grids and metric plots.

Masks are written as palette ("P") PNGs: any viewer shows colours, and `np.array(Image.open(f))`
still gives the class ids. The default palette starts with 20 colours of maximal contrast (Kelly's
list) so that frequent classes of street scenes and VOC never look alike; a dataset.yaml `palette`
replaces it.
"""

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


# Kenneth Kelly's colours of maximal contrast, without white and black (void is drawn white).
DISTINCT = ((243, 195, 0), (135, 86, 146), (243, 132, 0), (161, 202, 241), (190, 0, 50), (194, 178, 128),
            (132, 132, 130), (0, 136, 86), (230, 143, 172), (0, 103, 165), (249, 147, 121), (96, 78, 151),
            (246, 166, 0), (179, 68, 108), (220, 211, 0), (136, 45, 23), (141, 182, 0), (101, 69, 34),
            (226, 88, 34), (43, 61, 38))


def palette(num_colours: int, colours: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(n, 3) uint8 class colours: `colours` (e.g. a dataset.yaml palette) first, then the distinct list,
    then the PASCAL VOC bit-interleaved map for ids beyond it."""
    given = [tuple(int(v) for v in c) for c in (colours or ())] + list(DISTINCT)
    ids = np.arange(num_colours, dtype=np.int64)
    voc = np.zeros((num_colours, 3), dtype=np.int64)
    shift = 7
    while ids.any() and shift >= 0:
        for channel in range(3):
            voc[:, channel] |= ((ids >> channel) & 1) << shift
        ids >>= 3
        shift -= 1
    head = np.array(given[:num_colours], dtype=np.int64).reshape(-1, 3)
    return np.concatenate([head, voc[len(head):]]).astype(np.uint8)


def mask_image(mask: np.ndarray, colours: np.ndarray) -> Image.Image:
    """Class ids (h, w) as a palette PNG image (ids unchanged, shown in `colours`); 16-bit grey beyond 256 ids."""
    mask = np.asarray(mask)
    if mask.size and int(mask.max()) >= 256:
        return Image.fromarray(mask.astype(np.uint16))
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    table = np.full((256, 3), 255, dtype=np.uint8)  # unused ids (void) white
    table[:min(len(colours), 256)] = colours[:256]
    image.putpalette(table.reshape(-1).tolist())
    return image


def colorize(mask: np.ndarray, num_classes: int, colours: np.ndarray | None = None) -> np.ndarray:
    """Class ids (h, w) -> RGB (h, w, 3) uint8; ids outside [0, num_classes) (void) are white."""
    mask = np.asarray(mask).astype(np.int64)
    valid = (mask >= 0) & (mask < num_classes)
    table = palette(num_classes) if colours is None else colours
    colours = table[np.where(valid, mask, 0)]  # (h, w, 3)
    colours[~valid] = VOID_COLOUR
    return colours


def boundaries(mask: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another id -> (h, w) bool."""
    edge = np.zeros(mask.shape, dtype=bool)
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    return edge


def overlay(image: ImageLike, mask: np.ndarray, num_classes: int, alpha: float = 0.5,
            colours: np.ndarray | None = None) -> np.ndarray:
    """Blend the colourised mask over the image and darken class boundaries -> (h, w, 3) uint8."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image size {rgb.shape[:2]} differs from mask size {mask.shape}")
    out = (1 - alpha) * rgb + alpha * colorize(mask, num_classes, colours)
    out[boundaries(mask)] *= 0.3
    return out.clip(0, 255).astype(np.uint8)


def legend_strip(mask: np.ndarray, class_names: Sequence[str], colours: np.ndarray, width: int) -> np.ndarray:
    """A white strip (h, width, 3) uint8 with a colour swatch and the name of each class present in `mask`."""
    from PIL import ImageDraw, ImageFont

    present = [int(i) for i in np.unique(mask) if 0 <= i < len(class_names)]
    font = ImageFont.load_default()
    row_height, swatch, gap = 16, 11, 10
    entries = [(i, class_names[i], 4 + swatch + 4 + int(font.getlength(class_names[i]))) for i in present]
    lines: list[list[tuple[int, str, int]]] = [[]]
    used = 0
    for entry in entries:
        if lines[-1] and used + entry[2] > width:
            lines.append([])
            used = 0
        lines[-1].append(entry)
        used += entry[2] + gap
    strip = Image.new("RGB", (width, row_height * len(lines) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        x, y = 4, 2 + row * row_height
        for class_id, name, extent in line:
            draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(int(v) for v in colours[class_id]),
                           outline="black")
            draw.text((x + swatch + 4, y + 1), name, fill="black", font=font)
            x += extent + gap
    return np.asarray(strip)


def overlay_with_legend(image: ImageLike, mask: np.ndarray, class_names: Sequence[str],
                        colours: np.ndarray | None = None) -> np.ndarray:
    """`overlay` with a legend strip of the classes present appended below -> (h + strip, w, 3) uint8."""
    colours = palette(len(class_names)) if colours is None else colours
    blended = overlay(image, mask, len(class_names), colours=colours)
    return np.concatenate([blended, legend_strip(mask, class_names, colours, blended.shape[1])])


def thumbnail(array: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink an (h, w[, 3]) uint8 array (bilinear) so its long side is at most `max_side`."""
    height, width = array.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return array
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Render a figure with Agg to a PNG file, atomically (parents created; a planted symlink is replaced)."""
    from hummingbird_fungi.fileio import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    log.info("wrote %s", path)
    return path


def legend_handles(masks: Sequence[np.ndarray], class_names: Sequence[str],
                   colours: np.ndarray | None = None) -> list[Patch]:
    """Legend patches of the classes that occur in `masks`."""
    present = set()
    for mask in masks:
        present.update(int(i) for i in np.unique(mask) if 0 <= i < len(class_names))
    colours = palette(len(class_names)) if colours is None else colours
    return [Patch(color=colours[i] / 255, label=class_names[i]) for i in sorted(present)]


def overlay_grid(rows: Sequence[Mapping], path: str | Path, class_names: Sequence[str],
                 max_side: int = 320, title: str | None = None, colours: np.ndarray | None = None) -> Path:
    """Grid PNG with one row per image: image | prediction overlay | ground-truth overlay (when any).

    Each row is a mapping with `image` (PIL or (h, w, 3) uint8), `pred` (h, w) ids, optional `gt`
    (h, w) ids and optional `name` (row label, e.g. the file stem and its pixel accuracy).
    """
    if not rows:
        raise ValueError("overlay_grid needs at least one row")
    num_classes = len(class_names)
    colours = palette(num_classes) if colours is None else colours
    with_gt = any(row.get("gt") is not None for row in rows)
    columns = ["image", "prediction"] + (["ground truth"] if with_gt else [])
    aspects = [np.shape(row["pred"])[0] / np.shape(row["pred"])[1] for row in rows]  # h / w
    fig = Figure(figsize=(3.2 * len(columns), sum(3.2 * min(a, 1.5) + 0.3 for a in aspects) + 0.8),
                 layout="constrained")
    axes = fig.subplots(len(rows), len(columns), squeeze=False,
                        gridspec_kw={"height_ratios": [min(a, 1.5) for a in aspects]})
    for r, row in enumerate(rows):
        image = np.asarray(row["image"].convert("RGB") if isinstance(row["image"], Image.Image) else row["image"])
        panels = [image, overlay(image, row["pred"], num_classes, colours=colours)]
        if with_gt:
            gt = row.get("gt")
            panels.append(None if gt is None else overlay(image, gt, num_classes, colours=colours))
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
    handles = legend_handles(masks, class_names, colours)
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
