"""The Encoder interface (a frozen model mapping images to a patch-token grid) and its adapters.

`Encoder` is what the rest of the toolkit consumes: `forward` gives (B, h*w, E) patch tokens in
row-major order, `forward_tokens` gives all tokens (CLS and registers first) after the final norm,
and `default_layer` names the nn.Linear (dotted path in `encoder.model`, negative indices allowed)
whose gradient image FUNGI uses, `patch_layer` the one patch FUNGI uses (the default layer unless the
adapter knows a better one). The adapters wrap a timm ViT, a torch.hub DINO/DINOv2 module, a
torchvision ViT, a CNN feature map at a known stride, or an open-hummingbird-eval style feature
function; `create_encoder` picks the right one.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import Format
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import Tensor, nn
from torchvision.models import VisionTransformer as TorchvisionVisionTransformer

from hummingbird_fungi.config.schema import parse_size
from hummingbird_fungi.errors import ConfigError

log = logging.getLogger(__name__)

VIT_LAYER = "blocks.-1.attn.proj"
# Patch FUNGI on timm and hub ViTs: the last block's qkv projection. Its gradient passes through that
# block's attention, so each patch's feature also reflects the patches it attends to; measured against
# attn.proj on CamVid and DAVIS (docs/protocol.md#patch-fungi).
VIT_PATCH_LAYER = "blocks.-1.attn.qkv"
# The second Linear of the last block's MLP. Not `self_attention.out_proj`: nn.MultiheadAttention
# uses out_proj.weight functionally (F.multi_head_attention_forward), so a hook on it never fires.
TORCHVISION_LAYER = "encoder.layers.-1.mlp.3"
_FINGERPRINT_VALUES = 64

DEFAULT_GRID = 32  # patches per side when no input size is given (the reference's 1,024 patches)
FeatureFn = Callable[[nn.Module, Tensor], Any]


class Encoder(nn.Module):
    """A frozen model mapping images (B, 3, H, W) to a grid of patch tokens."""

    model: nn.Module  # the wrapped module; FUNGI gradient layers are looked up in it by dotted path
    name: str  # for logs and bank manifests
    weights_id: str  # identifies the weights ('random', 'file:<sha16>', 'hub:<name>', 'module:<fingerprint>')
    patch_size: int  # stride of the token grid in pixels
    embed_dim: int  # token dimension E
    num_prefix_tokens: int  # tokens before the patch grid in forward_tokens (CLS, registers)
    default_layer: str | None  # dotted path of the nn.Linear FUNGI uses by default; None if none
    patch_layer: str | None  # the nn.Linear patch FUNGI uses by default (default_layer unless given)
    architecture: str  # what the module is (timm model name, class name), for manifests

    def __init__(self, model: nn.Module, *, name: str | None, weights_id: str | None, patch_size: int,
                 embed_dim: int, num_prefix_tokens: int, default_layer: str | None,
                 architecture: str | None = None, patch_layer: str | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.name = name or type(model).__name__
        self.architecture = architecture or type(model).__name__
        self.weights_id = weights_id or f"module:{module_fingerprint(model)}"
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.default_layer = default_layer
        self.patch_layer = patch_layer or default_layer
        self.eval()

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) patch grid of an input of this size; ConfigError unless both are multiples of the patch."""
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(f"input size {height}x{width} is not a multiple of the patch size {self.patch_size} "
                              f"of encoder {self.name!r}")
        return height // self.patch_size, width // self.patch_size

    def input_size(self, size: Any = None) -> tuple[int, int]:
        """(H, W) from an int, [H, W] or 'HxW' (default: DEFAULT_GRID x DEFAULT_GRID patches), checked against
        the patch size."""
        height, width = (DEFAULT_GRID * self.patch_size,) * 2 if size is None else parse_size(size)
        self.grid_size(height, width)
        return int(height), int(width)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_prefix_tokens + h*w, E): prefix tokens, then patches row-major, after the norm.

        Implementations must not use no_grad/inference_mode: FUNGI back-propagates to these tokens.
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, h*w, E) patch tokens in row-major order, prefix tokens removed."""
        self.grid_size(x.shape[-2], x.shape[-1])
        return self.forward_tokens(x)[:, self.num_prefix_tokens:]

    def pooled(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, E) image embedding: the first prefix (CLS) token, else the mean patch token."""
        tokens = self.forward_tokens(x)
        return tokens[:, 0] if self.num_prefix_tokens else tokens.mean(1)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, weights_id={self.weights_id!r}, patch_size={self.patch_size}, "
                f"embed_dim={self.embed_dim}, num_prefix_tokens={self.num_prefix_tokens}, "
                f"default_layer={self.default_layer!r}, patch_layer={self.patch_layer!r}")


class TimmViTEncoder(Encoder):
    """A timm VisionTransformer (incl. DINOv2 with registers); switched to dynamic input size in place if needed."""

    def __init__(self, model: TimmVisionTransformer, name: str | None = None, weights_id: str | None = None,
                 architecture: str | None = None) -> None:
        if not model.dynamic_img_size:
            _make_timm_dynamic(model)
            log.info("switched timm %s to dynamic input size (any multiple of the patch size; positional "
                     "embeddings interpolated at run time); weights unchanged", type(model).__name__)
        super().__init__(model, name=name, weights_id=weights_id, patch_size=model.patch_embed.patch_size[0],
                         embed_dim=model.embed_dim, num_prefix_tokens=model.num_prefix_tokens,
                         default_layer=_linear_path(model, VIT_LAYER), patch_layer=_linear_path(model, VIT_PATCH_LAYER),
                         architecture=architecture or model.pretrained_cfg.get("architecture"))

    def forward_tokens(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, prefix + h*w, E) from the model's forward_features."""
        self.grid_size(x.shape[-2], x.shape[-1])
        return self.model.forward_features(x)

    def pooled(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, E) the model's own pooled embedding (CLS after the final norm for DINO)."""
        return self.model.forward_head(self.forward_tokens(x), pre_logits=True)


class HubViTEncoder(Encoder):
    """A torch.hub FAIR ViT: DINOv2 (forward_features dict, optional registers) or DINO v1 (get_intermediate_layers)."""

    def __init__(self, model: nn.Module, name: str | None = None, weights_id: str | None = None) -> None:
        dinov2 = hasattr(model, "forward_features")
        num_registers = int(getattr(model, "num_register_tokens", 0)) if dinov2 else 0
        patch_size = getattr(model, "patch_size", None) or model.patch_embed.patch_size
        if isinstance(patch_size, (tuple, list)):
            patch_size = patch_size[0]
        super().__init__(model, name=name, weights_id=weights_id, patch_size=patch_size, embed_dim=model.embed_dim,
                         num_prefix_tokens=1 + num_registers, default_layer=_linear_path(model, VIT_LAYER),
                         patch_layer=_linear_path(model, VIT_PATCH_LAYER))
        self._dinov2 = dinov2
        self._num_registers = num_registers

    def forward_tokens(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + R + h*w, E): [CLS, registers, patches] after the final norm."""
        self.grid_size(x.shape[-2], x.shape[-1])
        if not self._dinov2:
            return self.model.get_intermediate_layers(x, n=1)[0]
        out = self.model.forward_features(x)
        parts = [out["x_norm_clstoken"].unsqueeze(1)]
        if self._num_registers:
            parts.append(out["x_norm_regtokens"])
        parts.append(out["x_norm_patchtokens"])
        return torch.cat(parts, dim=1)


class TorchvisionViTEncoder(Encoder):
    """A torchvision VisionTransformer at any multiple of its patch size (positional embedding resized bicubically)."""

    def __init__(self, model: TorchvisionVisionTransformer, name: str | None = None,
                 weights_id: str | None = None) -> None:
        super().__init__(model, name=name, weights_id=weights_id, patch_size=model.patch_size,
                         embed_dim=model.hidden_dim, num_prefix_tokens=1,
                         default_layer=_linear_path(model, TORCHVISION_LAYER))

    def forward_tokens(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + h*w, E): torchvision's encoder pass with the patch grid of this input."""
        h, w = self.grid_size(x.shape[-2], x.shape[-1])
        patches = self.model.conv_proj(x).flatten(2).transpose(1, 2)  # (B, E, h, w) -> (B, h*w, E)
        tokens = torch.cat([self.model.class_token.expand(x.shape[0], -1, -1), patches], dim=1)
        tokens = tokens + self._pos_embedding(h, w)
        encoder = self.model.encoder
        return encoder.ln(encoder.layers(encoder.dropout(tokens)))

    def _pos_embedding(self, h: int, w: int) -> Tensor:
        """(1, 1 + h*w, E) positional embedding; the patch part bicubically resized when the grid is not native."""
        pos = self.model.encoder.pos_embedding
        native = self.model.image_size // self.patch_size
        if (h, w) == (native, native):
            return pos
        grid = pos[:, 1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        return torch.cat([pos[:, :1], grid.to(pos.dtype).flatten(2).transpose(1, 2)], dim=1)


class ConvEncoder(Encoder):
    """A CNN returning a dense feature map (B, C, h, w) at `stride` (or a dict of maps, one picked by `output`)."""

    def __init__(self, model: nn.Module, stride: int, name: str | None = None, weights_id: str | None = None,
                 output: str | None = None) -> None:
        model.eval()
        reference = next(itertools.chain(model.parameters(), model.buffers()), None)
        probe = torch.zeros(1, 3, 2 * stride, 2 * stride,
                            device=reference.device if reference is not None else None,
                            dtype=reference.dtype if reference is not None and reference.is_floating_point() else None)
        with torch.no_grad():
            feature_map = _select_map(model(probe), output, model)
        super().__init__(model, name=name, weights_id=weights_id, patch_size=stride, embed_dim=feature_map.shape[1],
                         num_prefix_tokens=0, default_layer=None)
        self.output = output
        self._check_map(feature_map, probe)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, h*w, C): the feature map flattened row-major."""
        self.grid_size(x.shape[-2], x.shape[-1])
        feature_map = _select_map(self.model(x), self.output, self.model)
        self._check_map(feature_map, x)
        return feature_map.flatten(2).transpose(1, 2)

    def _check_map(self, feature_map: Tensor, x: Tensor) -> None:
        """ConfigError unless the map is (B, C, H // stride, W // stride) for input x."""
        expected = (x.shape[0], x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if feature_map.dim() != 4 or (feature_map.shape[0], *feature_map.shape[2:]) != expected:
            raise ConfigError(f"{self.name}: input {tuple(x.shape)} gave a feature map {tuple(feature_map.shape)}, "
                              f"expected (B, C, h, w) = ({expected[0]}, C, {expected[1]}, {expected[2]}) "
                              f"at stride {self.patch_size}")


class CallableEncoder(Encoder):
    """A model plus an open-hummingbird-eval `ftr_extr_fn(model, images)` returning (B, N, D) or (features, attn)."""

    def __init__(self, model: nn.Module, feature_fn: FeatureFn, patch_size: int, embed_dim: int,
                 name: str | None = None, weights_id: str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"feature_fn needs an nn.Module to pass it, got {type(model).__name__}")
        super().__init__(model, name=name, weights_id=weights_id, patch_size=patch_size, embed_dim=embed_dim,
                         num_prefix_tokens=0, default_layer=None)
        self.feature_fn = feature_fn

    def forward_tokens(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, h*w, D) = feature_fn(model, x) (first item if it returns a tuple)."""
        h, w = self.grid_size(x.shape[-2], x.shape[-1])
        features = self.feature_fn(self.model, x)
        if isinstance(features, (tuple, list)):
            features = features[0]
        expected = (x.shape[0], h * w, self.embed_dim)
        if not isinstance(features, Tensor) or tuple(features.shape) != expected:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ConfigError(f"{self.name}: feature_fn gave {shape} for input {tuple(x.shape)}, expected "
                              f"(B, h*w, embed_dim) = {expected} (patch size {self.patch_size})")
        return features


def _select_map(out: Tensor | dict[str, Tensor], output: str | None, model: nn.Module) -> Tensor:
    """The (B, C, h, w) map of a CNN's output: the tensor itself, or the `output` entry of a dict of maps."""
    if not isinstance(out, dict):
        return out
    if output is None:
        if len(out) != 1:
            raise ConfigError(f"{type(model).__name__} returns feature maps {list(out)}: pick one with output=")
        return next(iter(out.values()))
    if output not in out:
        raise ConfigError(f"output {output!r} not among the feature maps {list(out)} of {type(model).__name__}")
    return out[output]


def module_fingerprint(model: nn.Module) -> str:
    """16 hex chars of sha256 over each parameter and buffer's name, shape, dtype and first/last 64 values."""
    digest = hashlib.sha256()
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() > 2 * _FINGERPRINT_VALUES:
            flat = torch.cat([flat[:_FINGERPRINT_VALUES], flat[-_FINGERPRINT_VALUES:]])
        digest.update(flat.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def _make_timm_dynamic(model: TimmVisionTransformer) -> None:
    """Switch a timm ViT built without dynamic_img_size=True to that mode in place (what its constructor sets)."""
    patch_embed = model.patch_embed
    if not all(hasattr(patch_embed, key) for key in ("strict_img_size", "flatten", "output_fmt")):
        raise ConfigError(f"cannot switch the timm {type(model).__name__} to dynamic input size: its "
                          f"{type(patch_embed).__name__} lacks strict_img_size/flatten/output_fmt; "
                          f"build it with dynamic_img_size=True")
    model.dynamic_img_size = True
    patch_embed.strict_img_size = False
    patch_embed.flatten = False  # flattened after the positional embedding is added
    patch_embed.output_fmt = Format.NHWC


def find_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path with (negative) integer indices, e.g. 'blocks.-1.attn.proj'."""
    module: Any = model
    for part in path.split("."):
        try:
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
        except (AttributeError, IndexError, TypeError) as error:
            raise ConfigError(f"layer {path!r} not found in {type(model).__name__} (at {part!r})") from error
    return module


def find_linear(model: nn.Module, path: str) -> nn.Linear:
    """The nn.Linear at `path` in `model`; ConfigError for anything else."""
    module = find_module(model, path)
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"layer {path!r} is a {type(module).__name__}, not an nn.Linear")
    return module


def _linear_path(model: nn.Module, path: str) -> str | None:
    """`path` if it names an nn.Linear in `model`, else None."""
    try:
        find_linear(model, path)
    except ConfigError:
        return None
    return path
