"""The self-supervised losses whose gradients make FUNGI features (patch and image level).

Each loss is per image (a vector over the batch), so an image's gradient never depends on the
other images of its batch. Definitions and the reference's variants: docs/protocol.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(z: Tensor, tau: float, tau_placement: str = "positive",
             negatives: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
    """The reference's per-image InfoNCE (over tokens; SimCLR's over views): z (B, T, L) -> (B,).

    Positives of row i are all other rows of its image (tokens, or views); the attraction term
    is divided by tau, the log-sum-exp over negatives and other rows too only if tau_placement
    is 'both' (the patch reference divides only the positive term). Negatives are
    per image (B, K, L) or shared (K, L); `keep` (B, K) bool drops some. Cosines come from a
    matmul of unit rows in fp32; the loss and its gradient are fused (`FusedInfoNCE`).
    """
    if z.shape[1] < 2:
        raise ValueError(f"InfoNCE needs at least two tokens or views per image, got {z.shape[1]}")
    unit = F.normalize(z.float(), dim=-1)
    neg_unit = None if negatives is None else F.normalize(negatives.float(), dim=-1)
    return FusedInfoNCE.apply(unit, neg_unit, keep, tau, tau_placement == "both")


class FusedInfoNCE(torch.autograd.Function):
    """InfoNCE of unit rows with a hand-written backward: the (B, T, T) cosines become the softmax numerators in
    place and are reused by the backward, no other (B, T, T) buffer; the attraction sum_{j != i} u_i . u_j is
    u_i . (S - u_i) with S the image's row sum."""

    @staticmethod
    def forward(ctx: Any, unit: Tensor, neg_unit: Tensor | None, keep: Tensor | None, tau: float,
                both: bool) -> Tensor:
        tokens = unit.shape[1]
        total = unit.sum(1, keepdim=True)  # (B, 1, L)
        attract = ((unit * total).sum(-1) - (unit * unit).sum(-1)) / ((tokens - 1) * tau)  # (B, T)
        scale = 1.0 / tau if both else 1.0
        exp = unit @ unit.transpose(1, 2)  # (B, T, T) cosines, softmax numerators below
        if both:
            exp.mul_(scale)
        exp.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
        peak = exp.amax(-1)  # (B, T)
        neg_exp = None
        if neg_unit is not None:
            neg_exp = unit @ neg_unit.transpose(-2, -1)  # (B, T, K)
            if keep is not None:
                neg_exp.masked_fill_(~keep[:, None, :], float("-inf"))
            if both:
                neg_exp.mul_(scale)
            peak = torch.maximum(peak, neg_exp.amax(-1))
            neg_exp.sub_(peak[..., None]).exp_()
        denominator = exp.sub_(peak[..., None]).exp_().sum(-1)  # (B, T)
        if neg_exp is not None:
            denominator += neg_exp.sum(-1)
        ctx.save_for_backward(unit, neg_unit, exp, neg_exp, denominator, total)
        ctx.scale, ctx.tau = scale, tau
        return (peak + denominator.log() - attract).mean(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        unit, neg_unit, exp, neg_exp, denominator, total = ctx.saved_tensors
        tokens = unit.shape[1]
        weight = grad[:, None] / tokens  # (B, 1): d loss_b / d (lse_i - attract_i)
        rows = (weight * ctx.scale / denominator)[..., None]  # (B, T, 1): softmax row scale
        soft = exp.mul_(rows)  # (B, T, T) d loss / d cos, in place (the graph is used once)
        d_unit = soft @ unit + soft.transpose(1, 2) @ unit  # (B, T, L)
        d_unit -= (2 * weight[..., None] / ((tokens - 1) * ctx.tau)) * (total - unit)
        d_neg = None
        if neg_exp is not None:
            neg_soft = neg_exp.mul_(rows)  # (B, T, K)
            d_unit += neg_soft @ neg_unit
            if ctx.needs_input_grad[1]:
                d_neg = neg_soft.transpose(1, 2) @ unit  # (B, K, L)
                d_neg = d_neg.sum(0) if neg_unit.ndim == 2 else d_neg
        return d_unit, d_neg, None, None, None


def kl_uniform_loss(logits: Tensor, temperature: float) -> Tensor:
    """Per image, kl_div(log_softmax(h/T), uniform) averaged over the L outputs: (B, L) -> (B,)."""
    log_p = F.log_softmax(logits / temperature, dim=-1)
    uniform = torch.full_like(log_p, 1.0 / logits.shape[-1])
    return F.kl_div(log_p, uniform, reduction="none").mean(-1)


def dino_loss(student: Tensor, teacher: Tensor, student_temp: float, teacher_temp: float) -> Tensor:
    """sum_{t in teacher} sum_{s in student} -<softmax(t/tt), log_softmax(s/ts)>: (B,V,L), (B,G,L) -> (B,)."""
    targets = F.softmax(teacher / teacher_temp, dim=-1)  # (B, G, L)
    log_probs = F.log_softmax(student / student_temp, dim=-1)  # (B, V, L)
    return -torch.einsum("bgl,bvl->b", targets, log_probs)
