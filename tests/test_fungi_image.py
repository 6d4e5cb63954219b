"""Image-level FUNGI on a tiny random ViT: losses by hand, per-sample gradients, views, projection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.features.fungi_image import (
    DINOObjective,
    ImageFungi,
    KLObjective,
    SimCLRObjective,
    build_objective,
    combination_name,
    eval_view,
    patchify,
    patchify_count,
    seeded_linear,
)
from hummingbird_fungi.features.losses import dino_loss, info_nce, kl_uniform_loss
from hummingbird_fungi.models.encoders import TimmViTEncoder

SIZE = 16  # tiny input: 2 x 2 patches of 8 px


def TinyBackbone(seed: int = 0, embed_dim: int = 32) -> TimmViTEncoder:
    """A tiny random timm ViT (2 x 2 patches of 8 px at SIZE, token pooling) as an encoder."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE,
                              patch_size=8, embed_dim=embed_dim, depth=2, num_heads=2, init_values=0.5,
                              dynamic_img_size=True)
    return TimmViTEncoder(model, name="tiny", weights_id=f"random-{seed}")


def small_objectives(embed_dim: int = 32, seed: int = 0) -> dict[str, object]:
    """The three objectives at tiny sizes (few views, small heads, 4 negatives)."""
    return {
        "kl": KLObjective(embed_dim, SIZE, seed, latent_dim=24),
        "dino": DINOObjective(embed_dim, SIZE, seed, global_views=2, local_views=2, latent_dim=40),
        "simclr": SimCLRObjective(embed_dim, SIZE, seed, num_patches=4, stride_scale=2, latent_dim=12, negatives=4),
    }


def make_extractor(seed: int = 0, projection: str = "dense") -> ImageFungi:
    """A tiny extractor with all three objectives; SimCLR negatives from random images."""
    extractor = ImageFungi(TinyBackbone(), SIZE, seed=seed, projection=projection)
    for objective in small_objectives(seed=seed).values():
        extractor.add_objective(objective)
    simclr = extractor.objectives["simclr"]
    negatives = torch.randn(4 * simclr.num_views, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    simclr.set_negatives(extractor.encode(negatives), [0, 1, 2, 3])
    return extractor


@pytest.fixture(scope="module")
def extractor() -> ImageFungi:
    return make_extractor()


def random_views(batch: int, views: int, seed: int = 3) -> torch.Tensor:
    """Random normalised-looking view tensors (B, V, 3, S, S)."""
    return torch.randn(batch, views, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- losses by hand


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def test_kl_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5], [3.0, 3.0, -1.0]])
    temperature = 2.0
    expected = []
    for row in logits.tolist():
        p = softmax([v / temperature for v in row])
        expected.append(sum((1 / 3) * (math.log(1 / 3) - math.log(q)) for q in p) / 3)
    assert torch.allclose(kl_uniform_loss(logits, temperature), torch.tensor(expected), atol=1e-6)


def test_dino_loss_matches_hand_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 2, 4, generator=generator)
    expected = []
    for b in range(2):
        total = 0.0
        for t in teacher[b].tolist():
            target = softmax([v / 0.07 for v in t])
            for s in student[b].tolist():
                log_probs = [math.log(q) for q in softmax([v / 0.1 for v in s])]
                total -= sum(p * lp for p, lp in zip(target, log_probs))
        expected.append(total)
    assert torch.allclose(dino_loss(student, teacher, 0.1, 0.07), torch.tensor(expected), rtol=1e-5)


@pytest.mark.parametrize("placement", ["both", "positive"])
def test_simclr_loss_matches_hand_computation(placement: str) -> None:
    generator = torch.Generator().manual_seed(1)
    z, negatives, tau = torch.randn(2, 3, 5, generator=generator), torch.randn(4, 5, generator=generator), 0.5
    expected = []
    for b in range(2):
        rows = [F.normalize(v, dim=0) for v in torch.cat([negatives, z[b]])]  # negatives, then positives
        losses = []
        for i in range(3):
            query = rows[4 + i]
            sims = [float(query @ r) for j, r in enumerate(rows) if j != 4 + i]
            positive = [float(query @ rows[4 + j]) for j in range(3) if j != i]
            scale = tau if placement == "both" else 1.0
            lse = math.log(sum(math.exp(s / scale) for s in sims))
            losses.append(-sum(positive) / (2 * tau) + lse)
        expected.append(sum(losses) / 3)
    got = info_nce(z, tau, placement, negatives)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)


def test_simclr_loss_needs_two_views() -> None:
    with pytest.raises(ValueError):
        info_nce(torch.randn(2, 1, 4), 0.1, "both", None)


# --------------------------------------------------------------------------- per-sample gradients


def naive_gradient(extractor: ImageFungi, objective, views: torch.Tensor) -> torch.Tensor:
    """dLoss/d[W | b] of one image's loss by plain autograd on the layer parameters -> (E_out, E_in + 1)."""
    weight, bias = extractor.layer.weight, extractor.layer.bias
    flags = weight.requires_grad, bias.requires_grad
    weight.requires_grad_(True), bias.requires_grad_(True)
    try:
        embeddings = extractor.encoder.pooled(views)[None]  # (1, V, E)
        loss = objective.loss(embeddings).sum()
        grad_w, grad_b = torch.autograd.grad(loss, [weight, bias])
    finally:
        weight.requires_grad_(flags[0]), bias.requires_grad_(flags[1])
    return torch.cat([grad_w, grad_b[:, None]], dim=1)


@pytest.mark.parametrize("name", ["kl", "dino", "simclr"])
def test_per_sample_gradient_equals_parameter_gradient(extractor: ImageFungi, name: str) -> None:
    objective = extractor.objectives[name]
    views = random_views(3, objective.num_views)
    gradients = extractor.per_sample_gradients(objective, views)  # (3, E, E + 1)
    assert gradients.shape == (3, 32, 33)
    for b in range(3):
        expected = naive_gradient(extractor, objective, views[b])
        assert torch.allclose(gradients[b], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["kl", "dino", "simclr"])
def test_features_do_not_leak_across_batch_items(extractor: ImageFungi, name: str) -> None:
    objective = extractor.objectives[name]
    views = random_views(4, objective.num_views)
    batched = extractor.gradient_features(objective, views)  # (4, P)
    for b in range(4):
        alone = extractor.gradient_features(objective, views[b:b + 1])
        assert torch.allclose(batched[b], alone[0], atol=1e-5)
    other = extractor.gradient_features(objective, torch.cat([views[:1], random_views(2, objective.num_views, 9)]))
    assert torch.allclose(other[0], batched[0], atol=1e-5)


@pytest.mark.parametrize("projection", ["dense", "structured"])
def test_feature_shapes_unit_norm_and_determinism(projection: str) -> None:
    first, second = make_extractor(projection=projection), make_extractor(projection=projection)
    for name in ("emb", "kl", "dino", "simclr"):
        block = first.block(name)
        views = random_views(2, 1 if name == "emb" else first.objectives[name].num_views)
        features = block.compute(views)
        assert features.shape == (2, block.dim) and block.dim == 32
        assert torch.isfinite(features).all()
        assert torch.allclose(features.norm(dim=1), torch.ones(2), atol=1e-5)
        assert torch.equal(features, second.block(name).compute(views))


def test_projection_seed_changes_gradient_features() -> None:
    views = random_views(2, 1)
    first = make_extractor(seed=0).block("kl").compute(views)
    other = ImageFungi(TinyBackbone(), SIZE, seed=1)
    other.add_objective(small_objectives(seed=0)["kl"])
    assert not torch.allclose(first, other.block("kl").compute(views))


def test_all_objectives_share_one_projection(extractor: ImageFungi) -> None:
    options = {extractor.block(name).options["projection"]["seed"] for name in ("kl", "dino", "simclr")}
    assert options == {0}
    assert extractor.projection.out_dim == extractor.encoder.embed_dim


def test_simclr_requires_negatives() -> None:
    extractor = ImageFungi(TinyBackbone(), SIZE)
    objective = small_objectives()["simclr"]
    extractor.add_objective(objective)
    with pytest.raises(RuntimeError, match="negatives"):
        extractor.per_sample_gradients(objective, random_views(1, objective.num_views))


# --------------------------------------------------------------------------- views and heads


@pytest.fixture(scope="module")
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_eval_view_and_patchify_shapes(image: Image.Image) -> None:
    assert eval_view(image, 224).shape == (3, 224, 224)
    assert patchify_count(224, 4, 6) == 49  # the paper's 7 x 7 grid of 112 px windows, stride 18
    assert patchify(image, 224, 4, 6).shape == (49, 3, 224, 224)
    assert patchify(image, SIZE, 4, 2).shape == (9, 3, SIZE, SIZE)


def test_dino_views_are_seeded_per_image(image: Image.Image) -> None:
    objective = DINOObjective(32, SIZE, seed=0, global_views=2, local_views=3)
    first = objective.views(image, 5)
    assert first.shape == (5, 3, SIZE, SIZE)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(first, objective.views(image, 5))
    assert not torch.equal(first, objective.views(image, 6))


def test_seeded_heads_are_default_init_and_distinct() -> None:
    head = seeded_linear(16, 8, seed=3)
    assert head.weight.abs().max() <= 0.25 and torch.equal(head.weight, seeded_linear(16, 8, seed=3).weight)
    dino = DINOObjective(32, SIZE, seed=0)
    assert not torch.equal(dino.student_head.weight, dino.teacher_head.weight)


def test_simclr_negative_images_are_seeded() -> None:
    objective = SimCLRObjective(32, SIZE, seed=0, negatives=5)
    ids = objective.negative_images(50)
    assert len(ids) == 5 == len(set(ids)) and ids == sorted(ids) and ids == objective.negative_images(50)


def test_build_objective_rejects_unknown_options() -> None:
    with pytest.raises(ConfigError):
        build_objective("kl", 32, SIZE, 0, {"temprature": 15})
    with pytest.raises(ConfigError):
        build_objective("byol", 32, SIZE, 0, {})


def test_combination_name_is_canonical() -> None:
    assert combination_name(["simclr", "emb", "kl"]) == "emb+kl+simclr"
