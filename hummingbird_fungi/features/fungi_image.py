"""Image-level FUNGI (docs/protocol.md#image-fungi-and-knn): projected per-image gradients of the KL,
DINO and SimCLR objectives.

For each image, views are made (KL: the eval view; DINO: global + local random crops;
SimCLR: a grid of overlapping crops), embedded (the backbone's pooled embedding, the CLS
token after the final norm for DINO/DINOv2), and an objective on fresh, seeded, never-trained
heads gives a per-image loss. The gradient of that loss at a linear layer (default the last
block's attn.proj) is ``G = sum_views sum_tokens g_t [a_t; 1]^T`` (weight and bias, bias last),
formed per image from the captured layer input a and output-gradient g (gradients.py), then
projected with the seeded projection shared by all objectives and splits (projection.py) and
L2-normalised. Losses are summed over images, so an image's gradient never depends on the
other images of its batch.

Choices where the reference implementations disagree (docs/protocol.md#deviations-and-switches):
* KL temperature 15 (paper jobs; fungivision's default is 1), latent 768, target exactly uniform.
* SimCLR temperature on the whole similarity matrix (the FUNGI image code; fungivision and the FUNGI
  segmentation code put it on the positive term only: `tau_placement="positive"`), 256 negative
  images (the FUNGI image code; fungivision 64).
* DINO teacher: the same backbone forward, detached, with its own random head (fungivision; equal to
  the FUNGI image code's second copy of the same frozen backbone).
* Projection scaling 1/sqrt(out_dim) (the FUNGI image code; fungivision's 1/sqrt(E(E+1)) only rescales, and the L2
  normalisation removes any scale).
* Numerics: fp32 on CPU, bf16 autocast for the backbone on CUDA; losses, per-image gradient
  matrices and the projection always in fp32.
"""

from __future__ import annotations

import abc
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from hummingbird_fungi.config.schema import DinoOptions, KLOptions, SimCLROptions
from hummingbird_fungi.config.typed import Section, with_overrides
from hummingbird_fungi.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.features.gradients import forward_with_capture, gradient_layer, random_head
from hummingbird_fungi.features.losses import dino_loss, info_nce, kl_uniform_loss
from hummingbird_fungi.features.projection import build_projection
from hummingbird_fungi.models.encoders import Encoder
from hummingbird_fungi.registry import Registry
from hummingbird_fungi.runtime import autocast, derived_seed, sample_ids, use_autocast

OBJECTIVES = ("kl", "dino", "simclr")
BLOCKS = ("emb",) + OBJECTIVES  # feature blocks in concatenation order
BICUBIC = InterpolationMode.BICUBIC


# --------------------------------------------------------------------------- views


def normalize_image(x: Tensor) -> Tensor:
    """ImageNet normalisation of (..., 3, H, W) values in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def eval_view(image: Image.Image, size: int) -> Tensor:
    """The eval transform: shorter side to size*256/224 (bicubic), centre crop size -> (3, S, S)."""
    image = TF.resize(image, round(size * 256 / 224), interpolation=BICUBIC)
    return normalize_image(TF.to_tensor(TF.center_crop(image, size)))


def eval_views(image: Image.Image, index: int, size: int) -> Tensor:
    """The eval view as a one-view stack (the embedding block's views) -> (1, 3, S, S)."""
    return eval_view(image, size)[None]


def random_crops(image: Image.Image, size: int, count: int, scale: tuple[float, float]) -> list[Tensor]:
    """`count` RandomResizedCrops (bicubic, default ratio) from the global torch RNG -> [(3, S, S)]."""
    crops = []
    for _ in range(count):
        top, left, height, width = RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
        crop = TF.resized_crop(image, top, left, height, width, [size, size], interpolation=BICUBIC)
        crops.append(normalize_image(TF.to_tensor(crop)))
    return crops


def patchify(image: Image.Image, size: int, num_patches: int, stride_scale: float) -> Tensor:
    """The FUNGI image code's SimCLR views: resize to size^2, windows of size/sqrt(num_patches),
    stride int(window/stride_scale),
    each resized back to size -> (n^2, 3, S, S)."""
    window = int(size / math.sqrt(num_patches))
    stride = max(1, int(window / stride_scale))
    x = TF.to_tensor(TF.resize(image, [size, size], interpolation=BICUBIC))  # (3, S, S)
    tiles = x.unfold(1, window, stride).unfold(2, window, stride)  # (3, n, n, w, w)
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, window, window)  # (n^2, 3, w, w)
    tiles = F.interpolate(tiles, size=(size, size), mode="bicubic", align_corners=False)
    return normalize_image(tiles)


def patchify_count(size: int, num_patches: int, stride_scale: float) -> int:
    """Number of SimCLR views `patchify` makes."""
    window = int(size / math.sqrt(num_patches))
    stride = max(1, int(window / stride_scale))
    return ((size - window) // stride + 1) ** 2


# --------------------------------------------------------------------------- objectives


def seeded_linear(in_dim: int, out_dim: int, seed: int) -> nn.Linear:
    """A never-trained nn.Linear with PyTorch's default init drawn from a seeded generator."""
    weight, bias = random_head(in_dim, out_dim, seed)
    layer = nn.Linear(in_dim, out_dim).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


class ImageObjective(abc.ABC):
    """A self-supervised objective: how to make an image's views and the per-image loss of their embeddings."""

    name: str = ""
    options_type: type[Section]

    def __init__(self, embed_dim: int, input_size: int, seed: int, options: Section | None = None,
                 **overrides: Any) -> None:
        if input_size < 1:
            raise ConfigError(f"{self.name}: input_size must be >= 1, got {input_size}")
        self.settings = with_overrides(self.options_type, options, overrides)
        self.embed_dim, self.input_size, self.seed = embed_dim, input_size, seed
        self.batch_size: int = self.settings.batch_size  # type: ignore[attr-defined]
        self._build(self.settings)

    @abc.abstractmethod
    def _build(self, opts: Any) -> None:
        """Set up the objective from its typed options (heads, view counts)."""

    @property
    @abc.abstractmethod
    def num_views(self) -> int:
        """Views per image V."""

    @abc.abstractmethod
    def views(self, image: Image.Image, index: int) -> Tensor:
        """The views of dataset image `index` -> (V, 3, S, S)."""

    @abc.abstractmethod
    def loss(self, embeddings: Tensor) -> Tensor:
        """Per-image loss of view embeddings (B, V, E) -> (B,)."""

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """Everything that changes the gradients (recorded in cache keys)."""

    def _head(self, role: int, out_dim: int) -> nn.Linear:
        """A seeded random head E -> out_dim; `role` tells heads of one objective apart."""
        return seeded_linear(self.embed_dim, out_dim, derived_seed(self.seed, OBJECTIVES.index(self.name), role))


class KLObjective(ImageObjective):
    """KL divergence between softmax(head(normalize(emb)) / T) and the uniform distribution."""

    name = "kl"
    options_type = KLOptions

    def _build(self, opts: KLOptions) -> None:
        self.temperature, self.latent_dim = opts.temperature, opts.latent_dim
        self.head = self._head(0, self.latent_dim)

    @property
    def num_views(self) -> int:
        return 1

    def views(self, image: Image.Image, index: int) -> Tensor:
        return eval_views(image, index, self.input_size)

    def loss(self, embeddings: Tensor) -> Tensor:
        self.head = self.head.to(embeddings.device)
        logits = self.head(F.normalize(embeddings[:, 0], dim=-1))  # (B, L)
        return kl_uniform_loss(logits, self.temperature)

    def options(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "latent_dim": self.latent_dim, "input_size": self.input_size,
                "seed": self.seed}


class DINOObjective(ImageObjective):
    """DINO self-distillation between teacher global views and student views, fresh heads."""

    name = "dino"
    options_type = DinoOptions

    def _build(self, opts: DinoOptions) -> None:
        self.global_views, self.local_views = opts.global_views, opts.local_views
        self.global_scale, self.local_scale = opts.global_scale, opts.local_scale
        self.latent_dim = opts.latent_dim
        self.teacher_temperature, self.student_temperature = opts.teacher_temperature, opts.student_temperature
        self.student_head = self._head(0, self.latent_dim)
        self.teacher_head = self._head(1, self.latent_dim)

    @property
    def num_views(self) -> int:
        return self.global_views + self.local_views

    def views(self, image: Image.Image, index: int) -> Tensor:
        """Global then local crops, drawn from a generator seeded by (seed, index) -> (V, 3, S, S)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, OBJECTIVES.index(self.name), 2, index))
            crops = random_crops(image, self.input_size, self.global_views, self.global_scale)
            crops += random_crops(image, self.input_size, self.local_views, self.local_scale)
        return torch.stack(crops)

    def loss(self, embeddings: Tensor) -> Tensor:
        self.student_head = self.student_head.to(embeddings.device)
        self.teacher_head = self.teacher_head.to(embeddings.device)
        unit = F.normalize(embeddings, dim=-1)  # (B, V, E)
        student = self.student_head(unit)  # (B, V, L)
        teacher = self.teacher_head(unit[:, :self.global_views].detach())  # (B, G, L)
        return dino_loss(student, teacher, self.student_temperature, self.teacher_temperature)

    def options(self) -> dict[str, Any]:
        return {"global_views": self.global_views, "local_views": self.local_views,
                "global_scale": list(self.global_scale), "local_scale": list(self.local_scale),
                "latent_dim": self.latent_dim, "teacher_temperature": self.teacher_temperature,
                "student_temperature": self.student_temperature, "input_size": self.input_size, "seed": self.seed}


class SimCLRObjective(ImageObjective):
    """InfoNCE between an image's patchified views, against a fixed set of negative latents.

    The negatives (views of training images, through the same backbone and head) must be
    set with `set_negatives` before the loss is used.
    """

    name = "simclr"
    options_type = SimCLROptions

    def _build(self, opts: SimCLROptions) -> None:
        self.num_patches, self.stride_scale = opts.num_patches, opts.stride_scale
        self.latent_dim, self.num_negatives = opts.latent_dim, opts.negatives
        self.temperature, self.tau_placement = opts.temperature, opts.tau_placement
        if self.num_views < 2:
            raise ConfigError(f"simclr: num_patches={self.num_patches}, stride_scale={self.stride_scale} "
                              f"make < 2 views")
        self.head = self._head(0, self.latent_dim)
        self.negatives: Tensor | None = None  # (M, L)
        self.negative_ids: list[int] = []

    @property
    def num_views(self) -> int:
        return patchify_count(self.input_size, self.num_patches, self.stride_scale)

    def views(self, image: Image.Image, index: int) -> Tensor:
        return patchify(image, self.input_size, self.num_patches, self.stride_scale)

    def negative_images(self, num_train: int) -> list[int]:
        """Training-set indices of the negative images: a seeded permutation's first `negatives`."""
        seed = derived_seed(self.seed, OBJECTIVES.index(self.name), 1)
        return sample_ids(num_train, self.num_negatives, seed).tolist()

    def set_negatives(self, embeddings: Tensor, image_ids: list[int]) -> None:
        """Store the negatives' latents head(emb) from their view embeddings (M, E)."""
        with torch.no_grad():
            self.negatives = self.head.to(embeddings.device)(embeddings.float())  # (M, L)
        self.negative_ids = list(image_ids)

    def loss(self, embeddings: Tensor) -> Tensor:
        if self.num_negatives and self.negatives is None:
            raise RuntimeError("simclr negatives are not set: call set_negatives first")
        self.head = self.head.to(embeddings.device)
        negatives = None if self.negatives is None else self.negatives.to(embeddings.device)
        return info_nce(self.head(embeddings), self.temperature, self.tau_placement, negatives)

    def options(self) -> dict[str, Any]:
        return {"num_patches": self.num_patches, "stride_scale": self.stride_scale, "views": self.num_views,
                "latent_dim": self.latent_dim, "negatives": self.num_negatives,
                "negative_ids": self.negative_ids, "temperature": self.temperature,
                "tau_placement": self.tau_placement, "input_size": self.input_size, "seed": self.seed}


IMAGE_OBJECTIVES: Registry[type[ImageObjective]] = Registry("FUNGI objective")
for _cls in (KLObjective, DINOObjective, SimCLRObjective):
    IMAGE_OBJECTIVES.register(_cls.name)(_cls)


def build_objective(name: str, embed_dim: int, input_size: int, seed: int,
                    options: Section | dict[str, Any] | None = None) -> ImageObjective:
    """An objective by name with its typed options (or a dict of them; unknown names raise ConfigError)."""
    cls = IMAGE_OBJECTIVES.get(name)
    if isinstance(options, dict):
        return cls(embed_dim, input_size, seed, **options)
    return cls(embed_dim, input_size, seed, options)


# --------------------------------------------------------------------------- extractor


@dataclass
class FeatureBlock:
    """One feature block: how to make an image's views and turn a batch of them into unit rows."""

    name: str  # emb | kl | dino | simclr
    dim: int
    views: Callable[[Image.Image, int], Tensor]  # (image, index) -> (V, 3, S, S)
    compute: Callable[[Tensor], Tensor]  # (B, V, 3, S, S) -> (B, dim) unit rows, float32
    batch_size: int
    options: dict[str, Any]


class ImageFungi:
    """Embeddings and projected per-image objective gradients of one backbone, one shared projection."""

    def __init__(self, encoder: Encoder, input_size: int, seed: int = 0, projection: str = "dense",
                 projection_options: dict[str, Any] | None = None, out_dim: int | None = None,
                 layer: str | None = None, autocast: str = "auto", embed_batch_size: int = 64) -> None:
        use_autocast(autocast, torch.device("cpu"))  # refuses unknown modes now
        self.encoder, self.input_size, self.seed = encoder, input_size, seed
        self.autocast, self.embed_batch_size = autocast, embed_batch_size
        self.layer_path, self.layer = gradient_layer(encoder, layer)
        self.projection = build_projection(projection, out_dim or encoder.embed_dim, self.layer.out_features,
                                           self.layer.in_features, seed, **(projection_options or {}))
        self.objectives: dict[str, ImageObjective] = {}

    @property
    def device(self) -> torch.device:
        """Device of the backbone's parameters."""
        return next(self.encoder.parameters()).device

    def add_objective(self, objective: ImageObjective) -> None:
        """Make an objective's gradient block available."""
        self.objectives[objective.name] = objective

    def options(self) -> dict[str, Any]:
        """What every block shares: backbone, layer, projection, input size."""
        return {"backbone": self.encoder.name, "architecture": self.encoder.architecture,
                "weights": self.encoder.weights_id, "layer": self.layer_path,
                "projection": self.projection.options(), "input_size": self.input_size,
                "autocast": use_autocast(self.autocast, self.device)}

    def block(self, name: str) -> FeatureBlock:
        """The feature block `name` (emb or an added objective)."""
        if name == "emb":
            return FeatureBlock("emb", self.encoder.embed_dim, functools.partial(eval_views, size=self.input_size),
                                self.embeddings, self.embed_batch_size, self.options())
        if name not in self.objectives:
            raise ConfigError(f"objective {name!r} was not configured; have {sorted(self.objectives)}")
        objective = self.objectives[name]
        return FeatureBlock(name, self.projection.out_dim, objective.views,
                            lambda views: self.gradient_features(objective, views), objective.batch_size,
                            {**self.options(), "objective": objective.options()})

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Raw image embeddings (n, 3, S, S) -> (n, E) float32."""
        with autocast(self.autocast, self.device):
            return self.encoder.pooled(images.to(self.device)).float()

    def embeddings(self, views: Tensor) -> Tensor:
        """The embedding block: eval views (B, 1, 3, S, S) -> (B, E) unit rows."""
        return F.normalize(self.encode(views[:, 0]), dim=-1)

    def per_sample_gradients(self, objective: ImageObjective, views: Tensor) -> Tensor:
        """Per-image gradient at the layer, summed over views and tokens: (B, V, 3, S, S) -> (B, E_out, E_in + 1)."""
        batch, count = views.shape[:2]
        with torch.inference_mode(False), torch.enable_grad():
            with autocast(self.autocast, self.device):
                capture = forward_with_capture(self.encoder.pooled, self.layer, views.flatten(0, 1).to(self.device))
            embeddings = capture.tokens.float().view(batch, count, -1)  # (B, V, E)
            loss = objective.loss(embeddings).sum()  # images independent: sum, not mean
            (g,) = torch.autograd.grad(loss, capture.output)  # (B V, T, E_out)
        g = g.float().reshape(batch, -1, g.shape[-1])  # (B, V T, E_out)
        a = capture.input.float().reshape(batch, -1, capture.input.shape[-1])  # (B, V T, E_in)
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=-1)  # (B, V T, E_in + 1)
        return g.transpose(1, 2) @ a  # (B, E_out, E_in + 1)

    def gradient_features(self, objective: ImageObjective, views: Tensor) -> Tensor:
        """Projected, L2-normalised per-image gradients: (B, V, 3, S, S) -> (B, P)."""
        gradients = self.per_sample_gradients(objective, views)
        return F.normalize(self.projection.project_full(gradients), dim=-1)


def combination_name(blocks: tuple[str, ...] | list[str]) -> str:
    """'emb+kl+dino' style name of a block combination, in canonical block order."""
    return "+".join(b for b in BLOCKS if b in blocks)
