"""The self-supervised losses whose gradients make FUNGI features (patch and image level).

Each loss is per image (a vector over the batch), so an image's gradient never depends on the
other images of its batch. Definitions and the reference's variants: docs/protocol.md.
"""

from __future__ import annotations

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
    matmul of unit rows in fp32.
    """
    tokens = z.shape[1]
    if tokens < 2:
        raise ValueError(f"InfoNCE needs at least two tokens or views per image, got {tokens}")
    unit = F.normalize(z.float(), dim=-1)
    cos = unit @ unit.transpose(1, 2)  # (B, T, T)
    self_mask = torch.eye(tokens, dtype=torch.bool, device=z.device)
    attract = cos.masked_fill(self_mask, 0.0).sum(-1) / ((tokens - 1) * tau)  # (B, T)
    logits = cos.masked_fill(self_mask, float("-inf"))
    if negatives is not None:
        neg = unit @ F.normalize(negatives.float(), dim=-1).transpose(-2, -1)  # (B, T, K)
        if keep is not None:
            neg = neg.masked_fill(~keep[:, None, :], float("-inf"))
        logits = torch.cat([neg, logits], dim=-1)  # (B, T, K + T): negatives, then positives
    if tau_placement == "both":
        logits = logits / tau
    return (torch.logsumexp(logits, dim=-1) - attract).mean(-1)


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
