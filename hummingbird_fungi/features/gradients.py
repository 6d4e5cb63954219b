"""Capture a linear layer's input and output-gradient without per-token gradient tensors
(docs/protocol.md#gradient-at-a-linear-layer).

The per-token gradient of a linear layer is ``g_t [a_t; 1]^T``: all that is needed is the
layer input ``a`` and ``g = dLoss/d(output)``. `forward_with_capture` runs a forward pass in
which everything before the layer runs without autograd and the layer output becomes a
leaf that requires grad, so ``torch.autograd.grad(loss, capture.output)`` back-propagates
only through what follows the layer (for the last block's ``attn.proj``: that block's
token-wise tail and the final norm), never through the backbone's earlier blocks and
never into parameter gradients.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.models.encoders import Encoder, find_linear


def gradient_layer(encoder: Encoder, path: str | None = None, patch: bool = False) -> tuple[str, nn.Linear]:
    """(path, layer) of the nn.Linear whose gradient FUNGI uses: `path` in encoder.model, else the encoder's
    default (its `patch_layer` for patch FUNGI)."""
    path = path or (encoder.patch_layer if patch else encoder.default_layer)
    if path is None:
        raise ConfigError(f"encoder {encoder.name!r} ({type(encoder).__name__}) has no default gradient layer: name "
                          f"an nn.Linear of its model with layer=PATH (features.fungi.layer)")
    return path, find_linear(encoder.model, path)


@dataclass
class Capture:
    """What one captured forward pass returns."""

    tokens: Tensor  # what `forward` returned, with a graph from `output` on
    input: Tensor  # (B, T, E_in) the layer input a, no graph
    output: Tensor  # (B, T, E_out) the layer output o, a leaf that requires grad


def forward_with_capture(forward: Callable[[Tensor], Tensor], layer: nn.Linear, images: Tensor) -> Capture:
    """Run `forward(images)` with autograd only from `layer`'s output on; capture its input and output.

    The pass runs under no_grad up to `layer`; a forward hook then detaches the layer output,
    makes it require grad and switches grad mode on for the rest of the pass (the enclosing
    no_grad restores the caller's mode on exit). The backbone's parameters are never
    modified; whether they require grad does not change the result.
    """
    captured: dict[str, Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if captured:
            raise RuntimeError("the captured layer ran twice in one forward pass")
        captured["input"] = inputs[0].detach()
        captured["output"] = output.detach().requires_grad_(True)
        torch.set_grad_enabled(True)  # record the tail; undone when the no_grad block below exits
        return captured["output"]

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            tokens = forward(images)
    finally:
        handle.remove()
    if not captured:
        raise ConfigError(f"the gradient layer ({type(layer).__name__} {layer.in_features}->{layer.out_features}) "
                          f"did not run as a module in the forward pass (e.g. nn.MultiheadAttention's out_proj "
                          f"is used functionally); choose another layer")
    if not tokens.requires_grad:
        raise ConfigError("the features do not depend on the gradient layer through autograd: does the feature "
                          "function run under no_grad/inference_mode, or is the layer after the features?")
    return Capture(tokens=tokens, input=captured["input"], output=captured["output"])


def random_head(in_dim: int, out_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A never-trained head: weight (out, in), bias (out) ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's default
    law), seeded."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_dim)
    weight = (torch.rand(out_dim, in_dim, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(out_dim, generator=generator) * 2 - 1) * bound
    return weight, bias
