"""The fast paths of patch FUNGI equal their plain definitions: the fused InfoNCE gradient, the masked support
search, and bf16 projection products close to fp32 ones."""

import pytest
import torch
import torch.nn.functional as F

from hummingbird_fungi.features.fungi_patch import FungiPatchFeatures
from hummingbird_fungi.features.losses import info_nce
from hummingbird_fungi.features.projection import build_projection
from test_fungi_patch import tiny_backbone


def plain_info_nce(z, tau, placement, negatives, keep):
    """InfoNCE written with autograd ops only (masked copies of the (B, T, T) cosines)."""
    unit = F.normalize(z, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    eye = torch.eye(z.shape[1], dtype=torch.bool)
    attract = cos.masked_fill(eye, 0.0).sum(-1) / ((z.shape[1] - 1) * tau)
    logits = cos.masked_fill(eye, float("-inf"))
    if negatives is not None:
        neg = unit @ F.normalize(negatives, dim=-1).transpose(-2, -1)
        if keep is not None:
            neg = neg.masked_fill(~keep[:, None, :], float("-inf"))
        logits = torch.cat([neg, logits], dim=-1)
    if placement == "both":
        logits = logits / tau
    return (torch.logsumexp(logits, dim=-1) - attract).mean(-1)


@pytest.mark.parametrize("placement", ["positive", "both"])
@pytest.mark.parametrize("negatives", [None, "per_image", "shared"])
def test_fused_info_nce_matches_autograd(placement: str, negatives: str | None) -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 9, 5, generator=generator, requires_grad=True)
    neg = None if negatives is None else torch.randn(*((3, 4, 5) if negatives == "per_image" else (4, 5)),
                                                      generator=generator, requires_grad=True)
    keep = torch.tensor([[True, False, True, True]] * 3) if negatives == "per_image" else None
    weights = torch.randn(3, generator=generator)
    inputs = [z] if neg is None else [z, neg]
    fused, plain = info_nce(z, 0.1, placement, neg, keep), plain_info_nce(z, 0.1, placement, neg, keep)
    torch.testing.assert_close(fused, plain)
    for got, want in zip(torch.autograd.grad((fused * weights).sum(), inputs),
                         torch.autograd.grad((plain * weights).sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_masked_support_search_skips_own_rows_like_a_brute_force_search(monkeypatch) -> None:
    monkeypatch.setattr("hummingbird_fungi.features.fungi_patch.SUPPORT_CHUNK", 7)  # several chunks and merges
    ext = FungiPatchFeatures(tiny_backbone(), negatives="support", neg_k=4, n_neg=2)
    generator = torch.Generator().manual_seed(0)
    support = F.normalize(torch.randn(30, 32, generator=generator), dim=-1)
    row_images = torch.arange(30) // 6  # images 0..4, 6 rows each
    ext.set_support(support, image_ids=row_images)
    queries = F.normalize(torch.randn(2, 5, 32, generator=generator), dim=-1)
    image_ids = torch.tensor([1, 4])
    scores = (queries @ support.T).masked_fill(row_images[None, None] == image_ids.view(2, 1, 1), float("-inf"))
    torch.testing.assert_close(ext._neighbours(queries, image_ids), scores.topk(4, dim=-1).indices)
    torch.testing.assert_close(ext._neighbours(queries), (queries @ support.T).topk(4, dim=-1).indices)


def test_bf16_projection_products_stay_close_to_fp32() -> None:
    generator = torch.Generator().manual_seed(0)
    g, a = torch.randn(40, 24, generator=generator), torch.randn(40, 16, generator=generator)
    for kind in ("dense", "structured"):
        projection = build_projection(kind, 32, 24, 16, seed=0)
        exact, low = projection.project_outer(g, a), projection.project_outer(g.bfloat16(), a.bfloat16()).float()
        assert F.cosine_similarity(exact, low, dim=-1).min() > 0.999
    backbone = tiny_backbone()
    images = torch.randn(2, 3, 32, 48, generator=generator)
    exact = FungiPatchFeatures(backbone, projection="dense", gradient_dtype="float32")(images)
    low = FungiPatchFeatures(backbone, projection="dense", gradient_dtype="bfloat16")(images)
    assert not torch.equal(exact, low) and F.cosine_similarity(exact, low, dim=-1).min() > 0.999
