"""The embedded default for `hbfungi demo`: procedurally generated street-like scenes with exact masks.

Every scene is drawn from one seed: sky (gradient and clouds) over a horizon, buildings with
window grids, a road in perspective with lane marks, vegetation beside it, cars on the road and
a round sign. Classes have distinct colours and textures, so even a randomly initialised ViT's
patch embeddings (mostly a random linear map of the pixels) carry some signal. Nothing here is
real data; the demo says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from hummingbird_fungi.fileio import make_dirs, save_image, write_atomic

log = logging.getLogger(__name__)

CLASS_NAMES = ("sky", "building", "road", "vegetation", "car", "sign")
SKY, BUILDING, ROAD, VEGETATION, CAR, SIGN = range(len(CLASS_NAMES))
# (height, width) of the scenes, cycled; one portrait and several odd sizes on purpose.
SIZES = ((240, 320), (225, 300), (270, 360), (256, 256), (213, 320), (300, 225), (241, 331), (192, 288))


@dataclass
class Scene:
    """One generated image (h, w, 3) uint8 with its class-id mask (h, w) uint8."""

    image: np.ndarray
    mask: np.ndarray


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: random values on a coarse grid, bilinearly upsampled -> (h, w)."""
    coarse = rng.uniform(-1, 1, size=(max(2, shape[0] // scale), max(2, shape[1] // scale))).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def _shapes(shape: tuple[int, int], draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    """The pixels (h, w) bool covered by what `draw` fills (PIL polygons, rectangles, ellipses) in colour 1."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _disc(cx: int, cy: int, radius: int) -> list[int]:
    """The bounding box of a filled circle, for ImageDraw.ellipse."""
    return [cx - radius, cy - radius, cx + radius, cy + radius]


def _paint(image: np.ndarray, mask: np.ndarray, region: np.ndarray, colour: np.ndarray, label: int) -> None:
    """Set the pixels of a bool region to a colour (per-pixel (h, w, 3) or one (3,)) and a class id."""
    image[region] = colour[region] if colour.ndim == 3 else colour
    mask[region] = label


def _sky(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, horizon: int) -> None:
    """Blue vertical gradient with soft white clouds above the horizon."""
    height, width = mask.shape
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]  # (h, 1, 1)
    top, bottom = np.array([40, 90, 200], np.float32), np.array([150, 200, 245], np.float32)
    colour = np.broadcast_to(top + t * (bottom - top), (height, width, 3)).copy()
    clouds = np.clip(_noise(rng, (height, width), 24) * 1.6 - 0.3, 0, 1)[..., None]  # (h, w, 1)
    colour = colour * (1 - clouds) + 245 * clouds
    region = np.zeros_like(mask, dtype=bool)
    region[:horizon] = True
    _paint(image, mask, region, colour, SKY)


def _buildings(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, horizon: int) -> None:
    """Rectangular facades on the horizon, each a flat stone/brick colour with a grid of dark windows."""
    height, width = mask.shape
    x = int(rng.integers(-width // 10, width // 10))
    while x < width:
        w = int(rng.integers(width // 8, width // 3))
        top = int(rng.integers(horizon // 6, horizon - horizon // 5))
        if rng.random() < 0.8:
            base = rng.choice([[150, 140, 130], [170, 110, 80], [120, 120, 125], [200, 185, 150]])
            x0, x1 = max(x, 0), min(x + w, width)
            facade = np.zeros((height, width, 3), np.float32)
            facade[:] = base
            step = int(rng.integers(8, 13))
            for wy in range(top + 4, horizon - 6, step):
                for wx in range(x0 + 3, x1 - 5, step):
                    facade[wy:wy + step // 2, wx:wx + step // 2] = (40, 50, 70)
            region = np.zeros_like(mask, dtype=bool)
            region[top:horizon, x0:x1] = True
            _paint(image, mask, region, facade, BUILDING)
        x += w + int(rng.integers(0, width // 10))


def _ground(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, horizon: int) -> tuple[int, int]:
    """Leafy green vegetation below the horizon and a grey road trapezoid with dashed lane marks."""
    height, width = mask.shape
    below = np.zeros_like(mask, dtype=bool)
    below[horizon:] = True
    leaves = _noise(rng, (height, width), 3)[..., None] * 45  # (h, w, 1) fine, strong texture
    green = np.array([50, 130, 45], np.float32) + leaves * np.array([0.6, 1.0, 0.4], np.float32)
    _paint(image, mask, below, green, VEGETATION)
    centre = width // 2 + int(rng.integers(-width // 8, width // 8))
    far, near = int(rng.integers(width // 40, width // 12)), int(rng.integers(width // 3, width // 2))
    poly = np.array([[centre - far, horizon], [centre + far, horizon],
                     [centre + near, height], [centre - near, height]], np.int32)
    road = _shapes(mask.shape, lambda d: d.polygon([tuple(int(v) for v in p) for p in poly], fill=1))
    grey = np.full((height, width, 3), 85, np.float32) + _noise(rng, (height, width), 2)[..., None] * 6
    for y in range(horizon + 4, height, 18):
        y1 = min(y + 8, height)
        half = max(1, (y - horizon) // 30)
        grey[y:y1, centre - half:centre + half + 1] = 235
    _paint(image, mask, road, grey, ROAD)
    return centre, near


def _cars(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, horizon: int, centre: int,
          near: int) -> None:
    """One to three boxy cars on the road, larger when nearer: saturated body, grey windows, black wheels."""
    height, width = mask.shape
    for _ in range(int(rng.integers(1, 4))):
        y = int(rng.integers(horizon + (height - horizon) // 4, height - 4))
        depth = (y - horizon) / max(height - horizon, 1)
        w = max(12, int(width * (0.12 + 0.28 * depth)))
        h = max(8, int(w * 0.55))
        x = centre + int((rng.random() - 0.5) * 2 * near * depth) - w // 2
        body = rng.choice([[200, 30, 30], [230, 120, 20], [180, 30, 160]]).astype(np.float32)
        paint = np.zeros((height, width, 3), np.float32)
        paint[:] = body
        paint[max(y - h + 2, 0):max(y - h // 2, 0), max(x + w // 4, 0):max(x + 3 * w // 4, 0)] = (170, 190, 200)
        wheels = [_disc(cx, y, max(2, h // 5)) for cx in (x + w // 5, x + 4 * w // 5)]
        paint[_shapes(mask.shape, lambda d: [d.ellipse(box, fill=1) for box in wheels])] = (15, 15, 15)

        def car(d: ImageDraw.ImageDraw) -> None:
            d.rectangle([x, y - h // 2, x + w, y], fill=1)
            d.rectangle([x + w // 5, y - h, x + 4 * w // 5, y - h // 2], fill=1)
            for box in wheels:
                d.ellipse(box, fill=1)

        _paint(image, mask, _shapes(mask.shape, car), paint, CAR)


def _sign(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, horizon: int) -> None:
    """A yellow disc with a black ring beside the road, in half of the scenes."""
    height, width = mask.shape
    if rng.random() < 0.4:
        return
    radius = int(rng.integers(max(6, width // 30), max(7, width // 14)))
    cx = int(rng.choice([rng.integers(radius, width // 4), rng.integers(3 * width // 4, width - radius)]))
    cy = int(rng.integers(max(radius, horizon - 2 * radius), min(height - radius, horizon + radius)))
    paint = np.zeros((height, width, 3), np.float32)
    region = _shapes(mask.shape, lambda d: d.ellipse(_disc(cx, cy, radius), fill=1))
    paint[region] = (20, 20, 20)
    paint[_shapes(mask.shape, lambda d: d.ellipse(_disc(cx, cy, int(radius * 0.75)), fill=1))] = (250, 210, 0)
    _paint(image, mask, region, paint, SIGN)


def make_scene(seed: int, size: tuple[int, int] = (240, 320)) -> Scene:
    """Draw one scene of `size` (h, w) from `seed`, with camera noise and a random exposure."""
    rng = np.random.default_rng(seed)
    height, width = size
    image = np.zeros((height, width, 3), np.float32)
    mask = np.zeros((height, width), np.uint8)
    horizon = int(height * rng.uniform(0.38, 0.55))
    _sky(rng, image, mask, horizon)
    _buildings(rng, image, mask, horizon)
    centre, near = _ground(rng, image, mask, horizon)
    _cars(rng, image, mask, horizon, centre, near)
    _sign(rng, image, mask, horizon)
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, 6, image.shape)
    return Scene(image.clip(0, 255).astype(np.uint8), mask)


def make_scenes(count: int, seed: int) -> list[Scene]:
    """`count` scenes with sizes cycling through SIZES, scene i drawn from seed*1000 + i."""
    return [make_scene(seed * 1000 + i, SIZES[i % len(SIZES)]) for i in range(count)]


def write_demo_data(root: str | Path, num_examples: int = 8, num_queries: int = 8, seed: int = 0) -> dict[str, Path]:
    """Write examples (images/, masks/, dataset.yaml), query images and their ground truth under `root`.

    Example images are PNG, query images JPEG (quality 92) as a camera would give; a symbolic link at
    `root` or below is refused, never written through. Returns the folders as {"examples", "images",
    "ground_truth"}.
    """
    root = Path(root)
    dirs = {"examples": root / "examples", "images": root / "images", "ground_truth": root / "ground_truth"}
    for sub in (dirs["examples"] / "images", dirs["examples"] / "masks", dirs["images"], dirs["ground_truth"]):
        make_dirs(sub, inside=root.parent)
    write_atomic(dirs["examples"] / "dataset.yaml",
                 f"name: demo_scenes\nnum_classes: {len(CLASS_NAMES)}\nclasses: [{', '.join(CLASS_NAMES)}]\n".encode())
    for i, scene in enumerate(make_scenes(num_examples, seed)):
        save_image(dirs["examples"] / "images" / f"example_{i:02d}.png", Image.fromarray(scene.image))
        save_image(dirs["examples"] / "masks" / f"example_{i:02d}.png", Image.fromarray(scene.mask))
    for i, scene in enumerate(make_scenes(num_queries, seed + 1)):
        save_image(dirs["images"] / f"scene_{i:02d}.jpg", Image.fromarray(scene.image), "JPEG", quality=92)
        save_image(dirs["ground_truth"] / f"scene_{i:02d}.png", Image.fromarray(scene.mask))
    log.info("wrote %d synthetic examples and %d synthetic query scenes (seed %d) under %s",
             num_examples, num_queries, seed, root)
    return dirs
