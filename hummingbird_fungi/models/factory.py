"""`create_encoder`: one factory that turns a user's model (or a backbone name) into an Encoder."""

from __future__ import annotations

import logging
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn
from torchvision.models import VisionTransformer as TorchvisionVisionTransformer

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.models.backbones import load_backbone
from hummingbird_fungi.models.encoders import (
    CallableEncoder,
    ConvEncoder,
    Encoder,
    FeatureFn,
    HubViTEncoder,
    TimmViTEncoder,
    TorchvisionViTEncoder,
)

log = logging.getLogger(__name__)


def create_encoder(model: Any, *, patch_size: int | None = None, embed_dim: int | None = None,
                   feature_fn: FeatureFn | None = None, stride: int | None = None, name: str | None = None,
                   weights_id: str | None = None, output: str | None = None,
                   device: str | torch.device | None = None, seed: int | None = None,
                   **backbone_kwargs: Any) -> Encoder:
    """Wrap `model` (an Encoder, a supported module, or a named backbone) in an Encoder, on `device` if given.

    A `str` is a named backbone built by `load_backbone(model, device=device, **backbone_kwargs)` (weights=,
    pretrained=, timm keywords; a random initialisation drawn from `seed` when given);
    `feature_fn` (with `patch_size`, `embed_dim`) wraps any module whose features that function
    returns; `stride` wraps a CNN returning a feature map at that stride (`output` picks a dict entry).
    """
    if isinstance(model, str):
        _refuse_options(f"named backbone {model!r}", feature_fn=feature_fn, stride=stride, name=name,
                        weights_id=weights_id, output=output)
        sizes = {"patch_size": patch_size, "embed_dim": embed_dim}  # the named ViT's own architecture keywords
        backbone_kwargs.update({key: value for key, value in sizes.items() if value is not None})
        if seed is not None:
            torch.manual_seed(seed)
        return load_backbone(model, **({"device": device} if device is not None else {}), **backbone_kwargs)
    if backbone_kwargs or seed is not None:
        named_only = sorted(backbone_kwargs) + (["seed"] if seed is not None else [])
        raise ConfigError(f"options {named_only} only apply to named backbones (a str), "
                          f"not to a {type(model).__name__}")
    encoder = _wrap(model, patch_size=patch_size, embed_dim=embed_dim, feature_fn=feature_fn, stride=stride,
                    name=name, weights_id=weights_id, output=output)
    if encoder is not model:  # a given Encoder was described when it was made
        log.info("encoder %s (%s): weights %s, patch %d, dim %d, %d prefix tokens, FUNGI layers %s (image), %s "
                 "(patch)", encoder.name, type(encoder).__name__, encoder.weights_id, encoder.patch_size,
                 encoder.embed_dim, encoder.num_prefix_tokens, encoder.default_layer, encoder.patch_layer)
    return encoder.to(device) if device is not None else encoder


def _wrap(model: Any, *, patch_size: int | None, embed_dim: int | None, feature_fn: FeatureFn | None,
          stride: int | None, name: str | None, weights_id: str | None, output: str | None) -> Encoder:
    """The adapter for a non-str `model` (see create_encoder)."""
    ids = {"name": name, "weights_id": weights_id}
    if isinstance(model, Encoder):
        _refuse_options("an Encoder", patch_size=patch_size, embed_dim=embed_dim, feature_fn=feature_fn,
                        stride=stride, output=output, **ids)
        return model
    if feature_fn is not None:
        _refuse_options("feature_fn", stride=stride, output=output)
        if patch_size is None or embed_dim is None:
            raise ConfigError("feature_fn= needs patch_size= (pixels per token) and embed_dim= (feature size)")
        return CallableEncoder(model, feature_fn, patch_size, embed_dim, **ids)
    vit_options = {"patch_size": patch_size, "embed_dim": embed_dim, "stride": stride, "output": output}
    if isinstance(model, TimmVisionTransformer):
        _refuse_options("a timm VisionTransformer", **vit_options)
        return TimmViTEncoder(model, **ids)
    if isinstance(model, TorchvisionVisionTransformer):
        _refuse_options("a torchvision VisionTransformer", **vit_options)
        return TorchvisionViTEncoder(model, **ids)
    if isinstance(model, nn.Module) and _is_hub_vit(model):
        _refuse_options("a torch.hub DINO/DINOv2 ViT", **vit_options)
        return HubViTEncoder(model, **ids)
    if isinstance(model, nn.Module) and stride is not None:
        _refuse_options("a CNN with stride=", patch_size=patch_size, embed_dim=embed_dim)
        return ConvEncoder(model, stride, output=output, **ids)
    raise ConfigError(f"cannot make an encoder from a {type(model).__name__}: accepted are an Encoder, a timm or "
                      f"torchvision VisionTransformer, a torch.hub DINO/DINOv2 ViT, a backbone name (str); for "
                      f"another model pass feature_fn= (with patch_size=, embed_dim=) or, for a CNN feature map, "
                      f"stride=")


def _is_hub_vit(model: nn.Module) -> bool:
    """Whether a non-timm module follows the FAIR torch.hub DINO (v1) or DINOv2 ViT conventions."""
    if type(model).__module__.startswith("timm."):
        return False
    return hasattr(model, "get_intermediate_layers") or (
        hasattr(model, "forward_features") and hasattr(model, "patch_embed"))


def _refuse_options(kind: str, **options: Any) -> None:
    """ConfigError naming the options (given, i.e. not None) that do not apply to `kind`."""
    given = [key for key, value in options.items() if value is not None]
    if given:
        raise ConfigError(f"option(s) {', '.join(given)} do not apply to {kind}")
