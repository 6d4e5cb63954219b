"""Small seeded builders shared by the tests and tools: tiny CPU-fast models of each kind an Encoder
wraps, and generated toy street scenes written as a folder dataset.

None of the models has trained weights; they exist to exercise shapes, token order and hooks quickly.
Every model builder seeds its own RNG stream and leaves the global torch RNG untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models.vision_transformer import Block, VisionTransformer
from PIL import Image
from torch import Tensor, nn

HUB_PATCH = 16  # patch size of the tiny torch.hub-style ViTs


def tiny_timm_vit(seed: int = 0, dynamic: bool = True, img_size: int = 64, patch_size: int = 16,
                  embed_dim: int = 32, depth: int = 2, num_heads: int = 2, reg_tokens: int = 0) -> VisionTransformer:
    """A headless random timm VisionTransformer (CLS + `reg_tokens` registers), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img_size,
                                  patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                  reg_tokens=reg_tokens, dynamic_img_size=dynamic)
    return model.eval()


def tiny_torchvision_vit(seed: int = 0, image_size: int = 64) -> torchvision.models.VisionTransformer:
    """A random torchvision VisionTransformer (patch 16, 2 layers, dim 32), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.VisionTransformer(image_size=image_size, patch_size=16, num_layers=2,
                                                     num_heads=2, hidden_dim=32, mlp_dim=64)
    return model.eval()


class TinyCNN(nn.Module):
    """Strided 3x3 convs: (B, 3, H, W) -> (B, dim, H / stride, W / stride); stride a power of two."""

    def __init__(self, stride: int = 16, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        if stride < 2 or stride & (stride - 1):
            raise ValueError(f"TinyCNN stride must be a power of two >= 2, got {stride}")
        channels = [3] + [8] * (stride.bit_length() - 2) + [dim]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            for c_in, c_out in zip(channels[:-1], channels[1:]):
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
            self.body = nn.Sequential(*layers[:-1])  # no ReLU after the last conv

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class _HubPatchEmbed(nn.Module):
    """FAIR-style patch embedding: (B, 3, H, W) -> (B, h*w, E) through a strided conv."""

    def __init__(self, patch_size: int | tuple[int, int], embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, HUB_PATCH, stride=HUB_PATCH)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _TinyHubViT(nn.Module):
    """Shared body of the tiny torch.hub-style ViTs: CLS, registers, interpolated pos embed, timm Blocks, norm."""

    def __init__(self, seed: int, num_register_tokens: int, hub_patch_size: int | tuple[int, int], img_size: int,
                 embed_dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.native_grid = img_size // HUB_PATCH
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embed = _HubPatchEmbed(hub_patch_size, embed_dim)
            self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, embed_dim))
            self.register_tokens = nn.Parameter(0.02 * torch.randn(1, num_register_tokens, embed_dim))
            self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + self.native_grid ** 2, embed_dim))
            self.blocks = nn.ModuleList(Block(embed_dim, num_heads, qkv_bias=True) for _ in range(depth))
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def _block_outputs(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> each block's (B, 1 + R + h*w, E) output, before the final norm."""
        h, w = x.shape[-2] // HUB_PATCH, x.shape[-1] // HUB_PATCH
        pos = self.pos_embed
        if (h, w) != (self.native_grid, self.native_grid):
            grid = pos[:, 1:].reshape(1, self.native_grid, self.native_grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch_embed(x)], dim=1) + pos
        tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), tokens[:, 1:]], dim=1)
        outputs = []
        for block in self.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        return outputs


class TinyDinoHub(_TinyHubViT):
    """A random ViT with the DINO (v1) torch.hub API: get_intermediate_layers(x, n) -> [(B, 1 + h*w, E)]."""

    def __init__(self, seed: int = 0, img_size: int = 64, embed_dim: int = 32, depth: int = 2,
                 num_heads: int = 2) -> None:
        super().__init__(seed, 0, HUB_PATCH, img_size, embed_dim, depth, num_heads)

    def get_intermediate_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """The last `n` blocks' outputs after the final norm, each (B, 1 + h*w, E), CLS first."""
        return [self.norm(out) for out in self._block_outputs(x)[-n:]]


class TinyDinov2Hub(_TinyHubViT):
    """A random ViT with the DINOv2 torch.hub API: forward_features(x) -> dict of normed CLS/register/patch tokens."""

    def __init__(self, seed: int = 0, num_register_tokens: int = 4, img_size: int = 64, embed_dim: int = 32,
                 depth: int = 2, num_heads: int = 2) -> None:
        super().__init__(seed, num_register_tokens, (HUB_PATCH, HUB_PATCH), img_size, embed_dim, depth, num_heads)
        self.patch_size = HUB_PATCH

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """x_norm_clstoken (B, E), x_norm_regtokens (B, R, E), x_norm_patchtokens (B, h*w, E), x_prenorm."""
        prenorm = self._block_outputs(x)[-1]
        normed = self.norm(prenorm)
        r = self.num_register_tokens
        return {"x_norm_clstoken": normed[:, 0], "x_norm_regtokens": normed[:, 1:1 + r],
                "x_norm_patchtokens": normed[:, 1 + r:], "x_prenorm": prenorm}


def patch_token_fn(model: VisionTransformer, images: Tensor) -> tuple[Tensor, None]:
    """Example open-hummingbird-eval feature function: (timm ViT patch tokens (B, h*w, E), no attention map)."""
    return model.forward_features(images)[:, model.num_prefix_tokens:], None


# --------------------------------------------------------------------------- generated data


CLASSES = ("sky", "road", "car")
VOID = 3


def make_scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A toy street scene: sky above, road below, a red car box, void pixels on a line."""
    h, w = size
    horizon = int(rng.integers(h // 3, 2 * h // 3))
    mask = np.zeros((h, w), np.uint8)
    mask[horizon:] = 1
    top, left = int(rng.integers(horizon - 8, h - 12)), int(rng.integers(0, w - 20))
    mask[top:top + 12, left:left + 20] = 2
    colours = np.array([[90, 140, 230], [110, 110, 110], [200, 30, 30]], np.float32)
    image = colours[mask] + rng.normal(0, 12, (h, w, 3))
    mask[horizon, :] = VOID
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_folder_dataset(root: Path, n_train: int = 6, n_val: int = 3, size=(64, 64), seed: int = 0) -> Path:
    """Write images/<split>, annotations/<split> and dataset.yaml under `root`."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = make_scene(rng, size)
            Image.fromarray(image).save(root / "images" / split / f"{split}{i:03d}.png")
            Image.fromarray(mask).save(root / "annotations" / split / f"{split}{i:03d}.png")
    (root / "dataset.yaml").write_text(
        f"name: toy\nnum_classes: 3\nignore_index: {VOID}\nclasses: [{', '.join(CLASSES)}]\n")
    return root
