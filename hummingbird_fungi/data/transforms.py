"""Image/mask reading and the paired train (memory bank) and eval transforms of the Hummingbird protocol."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import scipy.io
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

from hummingbird_fungi.data.archives import DataPath, as_path
from hummingbird_fungi.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_STD = (0.229, 0.224, 0.255)  # the reference code's typo for 0.225; default for segmentation presets

Stats = tuple[float, float, float]
_NORMALIZATIONS: dict[str, tuple[Stats, Stats]] = {
    "reference": (IMAGENET_MEAN, REFERENCE_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_MASK_MODES = {"1", "L", "P"} | _SIXTEEN_BIT_MODES
_JITTER_OPS = (  # (torchvision adjust function, low, high), applied in this order
    (TF.adjust_brightness, 0.9, 1.1),
    (TF.adjust_contrast, 0.9, 1.1),
    (TF.adjust_saturation, 0.9, 1.1),
    (TF.adjust_hue, -0.1, 0.1),
)


def normalization(name: str) -> tuple[Stats, Stats]:
    """(mean, std) of a normalisation preset: 'reference' (std 0.255 typo) or 'imagenet'."""
    if name not in _NORMALIZATIONS:
        raise ConfigError(f"unknown normalization {name!r}; expected one of {sorted(_NORMALIZATIONS)}")
    return _NORMALIZATIONS[name]


def _open_loaded(path: str | Path | DataPath) -> Image.Image:
    """Open and fully decode an image file (or archive member), raising DataError naming the path on any failure."""
    try:
        with as_path(path).open("rb") as stream, Image.open(stream) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def _sixteen_to_eight_bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit (or 32-bit integer) greyscale image to 8 bits."""
    values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
    return Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L")


def read_image(path: str | Path | DataPath) -> Image.Image:
    """An RGB PIL image with EXIF orientation applied; 16-bit, alpha, palette and CMYK inputs converted."""
    return to_rgb(_open_loaded(path), f"image {path}")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """A decoded PIL image of any mode (16-bit, alpha, palette, CMYK) as RGB; `name` is for error messages."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight_bit(image)
    elif image.mode in {"LA", "La", "PA", "RGBa"}:
        image = image.convert("RGBA")  # alpha is dropped below, not composited
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise DataError(f"cannot convert {name} (mode {image.mode}) to RGB: {err}") from err


def _read_mat_mask(path: DataPath) -> np.ndarray:
    """Class ids of an SBD annotation (`GTcls.Segmentation` of a .mat file)."""
    try:
        with path.open("rb") as stream:
            mat = scipy.io.loadmat(stream, squeeze_me=True, struct_as_record=False)
        segmentation = mat["GTcls"].Segmentation
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise DataError(f"cannot read SBD mask {path} (expected GTcls.Segmentation): {err}") from err
    mask = np.asarray(segmentation)
    if mask.ndim != 2:
        raise DataError(f"SBD mask {path} has shape {mask.shape}, expected a 2-D class map")
    return mask.astype(np.int64)


def read_mask(path: str | Path | DataPath) -> np.ndarray:
    """(h, w) int64 raw class ids of a label file, never colour-converted (palette masks give indices)."""
    path = as_path(path)
    if path.suffix.lower() == ".mat":
        return _read_mat_mask(path)
    try:
        with path.open("rb") as stream, Image.open(stream) as image:
            image.load()
            mode = image.mode
            mask = np.array(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read mask {path}: {err}") from err
    if mode not in _MASK_MODES:
        raise DataError(f"mask {path} has mode {mode} ({mask.shape[-1] if mask.ndim == 3 else 1} channels); "
                        f"masks must be single-channel class-id images (L, P or 16-bit)")
    return mask.astype(np.int64)


def _uniform(rng: torch.Generator, low: float, high: float) -> float:
    """One draw from U[low, high) using `rng`."""
    return torch.empty(1).uniform_(low, high, generator=rng).item()


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float],
                               ratio: tuple[float, float], rng: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop.get_params, drawn from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(rng, scale[0], scale[1])
        aspect = math.exp(_uniform(rng, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=rng).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=rng).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: whole image, aspect clamped to `ratio`, centred
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_normalized_tensor(image: Image.Image, mean: Stats, std: Stats) -> torch.Tensor:
    """ToTensor + Normalize of an RGB PIL image -> (3, h, w) float32."""
    tensor = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)
    return TF.normalize(tensor, list(mean), list(std))


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an (h, w) integer class map to size (H, W) with torch 'nearest' (legacy floor rule)."""
    resized = F.interpolate(mask[None, None].double(), size=size, mode="nearest")  # (1, 1, H, W)
    return resized[0, 0].long()


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """(h, w) int64 tensor of a numpy class map."""
    return torch.from_numpy(np.ascontiguousarray(mask)).long()


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate an (H, W) output size."""
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"transform size must be (H, W) with positive sides, got {size!r}")
    return int(size[0]), int(size[1])


class EvalTransform:
    """The evaluation transform: PIL bilinear resize to (H, W), ToTensor, Normalize; mask nearest-resized to (H, W)."""

    def __init__(self, size: tuple[int, int], normalize: str = "reference"):
        self.size = _check_size(size)
        self.mean, self.std = normalization(normalize)

    def __call__(self, image: Image.Image, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(3, H, W) float32 normalised image and (H, W) int64 mask (None without a mask)."""
        height, width = self.size
        resized = image.resize((width, height), Image.Resampling.BILINEAR)
        tensor = _to_normalized_tensor(resized, self.mean, self.std)  # (3, H, W)
        return tensor, None if mask is None else resize_mask(_mask_tensor(mask), self.size)


class TrainTransform:
    """The memory-bank train transform: random colour jitter, ToTensor, Normalize, paired random-resized-crop;
    all randomness from `rng`."""

    def __init__(self, size: tuple[int, int], normalize: str = "reference", jitter: bool = True, crop: bool = True,
                 crop_scale: tuple[float, float] = (0.5, 2.0), crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size = _check_size(size)
        self.mean, self.std = normalization(normalize)
        self.resize = EvalTransform(self.size, normalize)  # used instead of the crop when crop=False
        self.jitter = jitter
        self.crop = crop
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)

    def color_jitter(self, image: Image.Image, rng: torch.Generator) -> Image.Image:
        """Brightness, contrast, saturation, hue, each applied with probability 0.5, in that order."""
        for adjust, low, high in _JITTER_OPS:
            apply = torch.rand(1, generator=rng).item() < 0.5
            factor = _uniform(rng, low, high)  # drawn even when skipped: a fixed number of draws per image
            if apply:
                image = adjust(image, factor)
        return image

    def __call__(self, image: Image.Image, mask: np.ndarray, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, H, W) float32 normalised image and (H, W) int64 mask of raw ids."""
        if self.jitter:
            image = self.color_jitter(image, rng)
        if not self.crop:
            return self.resize(image, mask)
        tensor = _to_normalized_tensor(image, self.mean, self.std)  # (3, h, w)
        top, left, h, w = random_resized_crop_params(image.height, image.width, self.crop_scale,
                                                     self.crop_ratio, rng)
        patch = tensor[None, :, top:top + h, left:left + w]  # (1, 3, h', w')
        out = F.interpolate(patch, size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]  # (3, H, W)
        labels = resize_mask(_mask_tensor(mask)[top:top + h, left:left + w], self.size)  # (H, W)
        return out, labels
