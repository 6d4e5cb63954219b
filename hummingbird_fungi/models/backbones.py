"""Named backbones (DINO, DINOv2, any timm ViT) as encoders, with hub or local weights.

`load_backbone` builds a timm VisionTransformer with `dynamic_img_size=True` (any input whose sides
are multiples of the patch size; positional embeddings interpolated at run time) and loads either
the timm hub weights, a local checkpoint, or nothing (random init). Local checkpoints may use the
timm key layout or the original FAIR layouts (facebookresearch/dino, facebookresearch/dinov2,
including training checkpoints that wrap the backbone under 'teacher'/'student' with heads).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import socket
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from hummingbird_fungi.config.typed import at_least, finite
from hummingbird_fungi.errors import ConfigError, DataError
from hummingbird_fungi.models.encoders import TimmViTEncoder

log = logging.getLogger(__name__)

SHORT_NAMES: dict[str, str] = {
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
}

# Checkpoint dicts that wrap a state dict, in order of preference.
_WRAPPER_KEYS = ("model", "state_dict", "teacher", "student")
# Key prefixes of wrapped models: DDP, SSL meta-architectures (teacher preferred), backbone vs heads.
_STRIP_PREFIXES = ("module.", "teacher.", "student.", "backbone.")
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_HUB_PROBE_TIMEOUT_S = 3.0
_SHOWN_KEYS = 5
# timm ViT keywords that must be integers, with their least value (patch_size=0 divides by zero, depth='abc'
# fails late; depth=0, a ViT without blocks, is valid)
INT_OPTIONS = {"patch_size": 1, "depth": 0, "embed_dim": 1, "num_heads": 1}


def resolve_name(name: str) -> str:
    """Short name or timm name ('arch' or 'arch.tag') -> timm name; ConfigError with suggestions if unknown."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    arch, tag = split_model_name_tag(name)
    if timm.is_model(arch) and (not tag or name in timm.list_pretrained(name)):
        return name
    candidates = list(SHORT_NAMES) + timm.list_models() + timm.list_pretrained(f"{arch}*")
    suggestions = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
    raise ConfigError(f"unknown backbone {name!r}{hint} (short names: {', '.join(SHORT_NAMES)}; "
                      f"or any timm model name, see timm.list_models())")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True,
                  device: str | torch.device = "cpu", **model_kwargs: Any) -> TimmViTEncoder:
    """A named timm ViT as an encoder on `device`: local `weights` file, else hub weights, else random init."""
    timm_name = resolve_name(name)
    if weights is not None:
        model = _create_model(timm_name, **model_kwargs)
        weights_id = f"file:{_load_weights_file(model, Path(weights))}"
    elif pretrained:
        model, weights_id = _create_from_hub(timm_name, **model_kwargs)
    else:
        model = _create_model(timm_name, **model_kwargs)
        weights_id = "random"
        log.warning("backbone %s (%s) has RANDOM weights (pretrained=False, no weights file)", name, timm_name)
    model.requires_grad_(False)
    encoder = TimmViTEncoder(model, name=name, weights_id=weights_id, architecture=timm_name).to(device)
    log.info("backbone %s: timm %s, weights %s, patch %d, dim %d, %d prefix tokens", name, timm_name,
             weights_id, encoder.patch_size, encoder.embed_dim, encoder.num_prefix_tokens)
    return encoder


def backbone_option_problem(key: str, value: Any) -> str | None:
    """What is wrong with a timm model keyword given as a backbone option (None: nothing): the sizes of
    `INT_OPTIONS` must be integers of at least their least value, every other number finite."""
    if key not in INT_OPTIONS:
        return finite(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return "expected an integer"
    return at_least(INT_OPTIONS[key])(value)


def _create_model(timm_name: str, pretrained: bool = False, **model_kwargs: Any) -> VisionTransformer:
    """A headless timm ViT with run-time positional-embedding interpolation; a bad timm keyword (backbone
    option) is a ConfigError naming it, refused before the model is built or when timm fails on it."""
    options = {key: value for key, value in model_kwargs.items() if key != "pretrained_cfg_overlay"}
    for key, value in options.items():
        problem = backbone_option_problem(key, value)
        if problem:
            raise ConfigError(f"backbone option {key}={value!r}: {problem}")
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True,
                                  **model_kwargs)
    except Exception as error:  # noqa: BLE001 - timm and torch refuse a bad keyword in many ways
        if isinstance(error, OSError) or not (options or isinstance(error, TypeError)):
            raise  # a download failure (the caller's message), or a failure no keyword of ours caused
        given = f" with backbone options {', '.join(f'{k}={v!r}' for k, v in options.items())}" if options else ""
        raise ConfigError(f"cannot build backbone {timm_name!r} as a dynamic-size ViT{given}: {error}") from error
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"backbone {timm_name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


# --------------------------------------------------------------------------- hub weights


def _create_from_hub(timm_name: str, **model_kwargs: Any) -> tuple[VisionTransformer, str]:
    """Model with timm hub weights (from the local cache when present) and its weights id."""
    cfg = get_pretrained_cfg(timm_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(f"timm has no pretrained weights for {timm_name!r}: pass --weights FILE "
                          f"(model.weights=FILE) or model.pretrained=false")
    hub_name = f"{split_model_name_tag(timm_name)[0]}.{cfg.tag}" if cfg.tag else timm_name
    cached = _cached_hub_file(cfg)
    if cached is not None:
        log.info("loading %s weights from the local cache %s", hub_name, cached)
        return _create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": cached},
                             **model_kwargs), f"hub:{hub_name}"
    advice = f"pass a local checkpoint with --weights FILE (model.weights=FILE) for backbone {timm_name!r}"
    if not _hub_reachable(cfg):
        raise ConfigError(f"pretrained weights for {hub_name} are not cached and the model hub is unreachable "
                          f"(offline); {advice}")
    try:
        return _create_model(timm_name, pretrained=True, **model_kwargs), f"hub:{hub_name}"
    except (OSError, RuntimeError) as error:
        raise ConfigError(f"could not download pretrained weights for {hub_name} ({error}); {advice}") from error


def hub_weights_cached(name: str) -> bool:
    """Whether the hub weights of a named backbone are already on this machine (no network is used)."""
    cfg = get_pretrained_cfg(resolve_name(name))
    return cfg is not None and _cached_hub_file(cfg) is not None


def _cached_hub_file(cfg: Any) -> str | None:
    """Path of already-downloaded weights for a timm pretrained cfg (HF cache or torch hub cache), if any."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILENAMES):
            cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(cached, str):
                return cached
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return str(path)
    return None


def _hub_reachable(cfg: Any) -> bool:
    """Whether the weights host answers quickly (always True behind a proxy, False in HF offline mode)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if urllib.request.getproxies().get("https"):
        return True
    host = urlparse(constants.ENDPOINT if cfg.hf_hub_id else cfg.url).hostname
    try:
        socket.create_connection((host, 443), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- local weights


def _load_weights_file(model: VisionTransformer, path: Path) -> str:
    """Load a timm- or FAIR-layout checkpoint into `model` strictly; returns the file's short hash."""
    state_dict = _model_state_dict(_read_checkpoint(path), path)
    if not any(key.startswith("head.") for key in model.state_dict()):
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
    try:
        state_dict = checkpoint_filter_fn(state_dict, model)  # FAIR DINOv2 -> timm, pos_embed resampling
    except Exception as error:  # noqa: BLE001 - any failure means the file does not fit this model
        raise DataError(f"weights file {path} does not fit backbone {_arch(model)}: "
                        f"{error}") from error
    _check_keys(state_dict, model, path)
    model.load_state_dict(state_dict, strict=True)
    digest = file_sha256(path)[:16]
    log.info("loaded %d tensors from %s (sha256 %s)", len(state_dict), path, digest)
    return digest


def _arch(model: VisionTransformer) -> str:
    """timm architecture name of a model, for messages."""
    return str(model.pretrained_cfg.get("architecture", type(model).__name__))


def _read_checkpoint(path: Path) -> Any:
    """Raw object stored in a .pth/.pt/.bin (weights_only) or .safetensors file."""
    if not path.is_file():
        raise DataError(f"weights file not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt or foreign file formats raise many types
        raise DataError(f"cannot read weights file {path}: {error}") from error


def _model_state_dict(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """Backbone tensors of a checkpoint: unwrap 'model'/'teacher'/..., strip DDP/SSL prefixes, unchunk."""
    while isinstance(checkpoint, dict):
        wrapped = next((checkpoint[key] for key in _WRAPPER_KEYS if isinstance(checkpoint.get(key), dict)), None)
        if wrapped is None:
            break
        checkpoint = wrapped
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise DataError(f"weights file {path} holds no state dict (got {type(checkpoint).__name__})")
    state_dict = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    for prefix in _STRIP_PREFIXES:
        if any(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    # FAIR DINOv2 block chunks (giant training): blocks.<chunk>.<block>.* -> blocks.<block>.*
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key): value for key, value in state_dict.items()}


def _check_keys(state_dict: dict[str, torch.Tensor], model: VisionTransformer, path: Path) -> None:
    """DataError naming the file and the first missing/unexpected/mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    shapes = [f"{key} {tuple(value.shape)} vs {tuple(expected[key].shape)}" for key, value in state_dict.items()
              if key in expected and value.shape != expected[key].shape]
    problems = [f"{len(keys)} {kind}: {', '.join(keys[:_SHOWN_KEYS])}{', ...' if len(keys) > _SHOWN_KEYS else ''}"
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
                if keys]
    if problems:
        raise DataError(f"weights file {path} does not match backbone "
                        f"{_arch(model)}: {'; '.join(problems)}")
