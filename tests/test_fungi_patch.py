"""Patch-level FUNGI on tiny random ViTs: fast path vs a naive per-token-gradient path, and its contract."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from hummingbird_fungi.models.encoders import TimmViTEncoder, find_linear
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.features import build_patch_features
from hummingbird_fungi.features.fungi_patch import (
    FungiPatchFeatures,
    gather_negatives,
    keep_mask,
)
from hummingbird_fungi.features.gradients import forward_with_capture
from hummingbird_fungi.features.losses import info_nce

TAU = 0.07


def tiny_backbone(reg_tokens: int = 0, seed: int = 0) -> TimmViTEncoder:
    """A frozen tiny random timm ViT (patch 8, width 32, 2 blocks) as an encoder."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, init_values=0.5, reg_tokens=reg_tokens,
                              dynamic_img_size=True)
    return TimmViTEncoder(model.requires_grad_(False), name="tiny", weights_id="random")


@pytest.fixture(scope="module")
def backbone() -> TimmViTEncoder:
    return tiny_backbone()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(1))  # 4 x 6 = 24 patches


def reference_loss(z: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """The FUNGI segmentation code's info_nce_loss for one image as written (broadcast cosine, -1e4 diagonal),
    in fp32."""
    tokens, k = z.shape[0], negatives.shape[0]
    columns = F.normalize(torch.cat([negatives, z]), dim=-1)
    sim = F.cosine_similarity(F.normalize(z, dim=-1)[:, None], columns[None], dim=-1)  # (T, K + T)
    idx = torch.arange(tokens)
    sim = sim.clone()
    sim[idx, k + idx] = -1e4
    positives = sim[:, k:].clone()
    positives[idx, idx] = 0.0
    return (torch.logsumexp(sim, dim=1) - positives.sum(1) / (tokens - 1) / tau).mean()


def reference_negatives(ext: FungiPatchFeatures, tokens: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The FUNGI segmentation code's negatives for one image's tokens (T, E): exact top-k, gather, (buggy)
    reshape, head, keep-mask."""
    count, dim = tokens.shape
    ids = (F.normalize(tokens, dim=-1) @ support.T).topk(ext.neg_k, dim=1).indices  # (T, K)
    rows = support[ids.reshape(-1)]
    if ext.negatives == "support_scrambled":
        rows = rows.reshape(count, dim, ext.neg_k).permute(0, 2, 1)
    rows = rows.reshape(count, ext.neg_k, dim)[:, :ext.n_neg].reshape(-1, dim)  # (T n_neg, E)
    keep = torch.rand(len(rows), generator=torch.Generator().manual_seed(ext.neg_seed)) <= ext.keep_prob
    return (rows @ ext.head_weight.T + ext.head_bias)[keep]


def naive_features(ext: FungiPatchFeatures, images: torch.Tensor, support: torch.Tensor | None = None,
                   loss_of=None) -> torch.Tensor:
    """FUNGI with per-token weight gradients materialised by autograd and the explicit dense P.

    `loss_of(z)` (z: head outputs (B, T, L) with a graph) replaces the reference InfoNCE."""
    model, prefix = ext.encoder.model, ext.encoder.num_prefix_tokens
    proj = find_linear(model, ext.layer_path)
    per_token = {}

    def forward(x: torch.Tensor) -> torch.Tensor:  # x (B, T, E_in); one weight copy per token
        batch, tokens, _ = x.shape
        per_token["w"] = proj.weight.detach().expand(batch, tokens, -1, -1).clone().requires_grad_()
        per_token["b"] = proj.bias.detach().expand(batch, tokens, -1).clone().requires_grad_()
        return torch.einsum("btoi,bti->bto", per_token["w"], x) + per_token["b"]

    proj.forward = forward
    try:
        tokens = model.forward_features(images)  # (B, T, E), full graph
    finally:
        del proj.forward
    z = tokens @ ext.head_weight.T + ext.head_bias
    loss = loss_of(z) if loss_of is not None else sum(
        reference_loss(z[b], z.new_zeros(0, z.shape[-1]) if support is None
                       else reference_negatives(ext, tokens[b].detach(), support), TAU)
        for b in range(len(images)))
    grad_w, grad_b = torch.autograd.grad(loss, [per_token["w"], per_token["b"]])
    grads = torch.cat([grad_w, grad_b[..., None]], dim=-1)[:, prefix:]  # (B, N, E_out, E_in + 1)
    dense = torch.cat([ext.projection.chunk(i) for i in range(ext.projection.num_chunks)]).float()
    phi = grads.flatten(2) @ dense.flatten(1).T / math.sqrt(dense.shape[0])  # (B, N, P)
    x_hat = F.normalize(tokens[:, prefix:].detach(), dim=-1)
    return F.normalize(torch.cat([x_hat, F.normalize(phi, dim=-1)], dim=-1), dim=-1)


@pytest.mark.parametrize("layer", [None, "blocks.-1.attn.proj", "blocks.0.mlp.fc2"])  # None: the qkv default
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_fast_path_equals_naive_per_token_gradients(reg_tokens: int, layer: str | None, images) -> None:
    tiny = tiny_backbone(reg_tokens=reg_tokens)
    ext = FungiPatchFeatures(tiny, projection="dense", head_dim=8, layer=layer, gradient_dtype="float32")
    assert ext.layer_path == (layer or "blocks.-1.attn.qkv")
    fast, naive = ext(images), naive_features(ext, images)
    assert fast.shape == naive.shape == (3, 24, 64) and ext.dim == 64
    assert F.cosine_similarity(fast, naive, dim=-1).min() > 0.9999
    # the gradient half alone also matches (not dominated by the shared embedding half)
    assert F.cosine_similarity(fast[..., 32:], naive[..., 32:], dim=-1).min() > 0.9999
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-5)


def kl_reference(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over tokens of KL(uniform || softmax(z / T)) / L, written out: (1/L) sum_l u (log u - log p_l)."""
    length = z.shape[-1]
    log_p = z / temperature - torch.logsumexp(z / temperature, dim=-1, keepdim=True)
    return ((math.log(1 / length) - log_p) / length).sum(-1).div(length).sum()


def dino_reference(ext: FungiPatchFeatures, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each patch against the same patch of the mirrored image, patch by patch."""
    opts = ext.settings
    with torch.no_grad():
        mirrored = ext.encoder.model.forward_features(images.flip(-1))  # (B, T, E)
    prefix = ext.encoder.num_prefix_tokens
    h, w = ext.encoder.grid_size(*images.shape[-2:])
    order = list(range(prefix)) + [prefix + r * w + (w - 1 - c) for r in range(h) for c in range(w)]
    teacher = mirrored[:, order] @ ext.head_weight.T + ext.head_bias  # token t <- mirrored token at (r, w-1-c)
    teacher = teacher - teacher.mean(1, keepdim=True)
    target = torch.softmax(teacher / opts.teacher_temperature, dim=-1)
    return -(target * torch.log_softmax(z / opts.student_temperature, dim=-1)).sum()


@pytest.mark.parametrize("objective", ["kl", "dino"])
def test_patch_objectives_equal_naive_per_token_gradients(objective: str, backbone, images) -> None:
    ext = FungiPatchFeatures(backbone, projection="dense", head_dim=8, objective=objective, kl_temperature=2.0,
                            gradient_dtype="float32")
    loss_of = ((lambda z: kl_reference(z, 2.0)) if objective == "kl"
               else (lambda z: dino_reference(ext, images, z)))
    fast, naive = ext(images), naive_features(ext, images, loss_of=loss_of)
    assert F.cosine_similarity(fast[..., 32:], naive[..., 32:], dim=-1).min() > 0.9999
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-5)
    infonce = FungiPatchFeatures(backbone, projection="dense", head_dim=8)(images)
    assert (fast[..., 32:] - infonce[..., 32:]).abs().max() > 0.05  # a different gradient, not the default's


def test_negatives_need_the_infonce_objective(backbone) -> None:
    with pytest.raises(ConfigError, match="negatives='support' needs objective=infonce"):
        FungiPatchFeatures(backbone, objective="kl", negatives="support")


@pytest.mark.parametrize("negatives", ["support", "support_scrambled"])
def test_fast_path_equals_naive_with_support_negatives(negatives: str, backbone, images) -> None:
    with torch.no_grad():
        support = F.normalize(backbone(torch.randn(4, 3, 32, 48)).reshape(-1, 32), dim=-1)  # (96, E)
    ext = FungiPatchFeatures(backbone, projection="dense", negatives=negatives, neg_k=3, n_neg=2, neg_seed=4,
                            gradient_dtype="float32")
    ext.set_support(support)
    fast, naive = ext(images), naive_features(ext, images, support)
    assert F.cosine_similarity(fast[..., 32:], naive[..., 32:], dim=-1).min() > 0.9999
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-5)  # fixed vs scrambled differ by ~1e-2


def test_capture_gives_plain_tokens_and_frozen_graph(backbone, images) -> None:
    layer = find_linear(backbone.model, "blocks.-1.attn.proj")
    capture = forward_with_capture(backbone.forward_tokens, layer, images)
    with torch.no_grad():
        plain = backbone.forward_tokens(images)
    torch.testing.assert_close(capture.tokens, plain)
    assert capture.output.requires_grad and capture.output.is_leaf and not capture.input.requires_grad
    assert capture.input.shape == (3, 25, 32) and capture.output.shape == (3, 25, 32)
    assert all(p.grad is None for p in backbone.model.parameters())
    unfrozen = tiny_backbone()
    unfrozen.model.requires_grad_(True)
    torch.testing.assert_close(FungiPatchFeatures(unfrozen)(images), FungiPatchFeatures(backbone)(images))
    assert all(p.grad is None for p in unfrozen.model.parameters())


@pytest.mark.parametrize("options", [{}, {"projection": "dense"}, {"tau_placement": "both", "grad_weight": 0.5}])
def test_batch_independence_select_and_determinism(backbone, images, options) -> None:
    ext = FungiPatchFeatures(backbone, **options)
    full = ext(images)
    assert full.shape == (3, 24, ext.dim) and torch.isfinite(full).all()
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(3, 24))
    torch.testing.assert_close(ext(images[1:2]), full[1:2], rtol=1e-5, atol=1e-5)
    select = torch.tensor([[0, 5, 23], [7, 7, 1], [2, 3, 4]])
    picked = torch.gather(full, 1, select[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(ext(images, select), picked, rtol=1e-5, atol=1e-5)
    assert torch.equal(FungiPatchFeatures(backbone, **options)(images), full)


def test_no_nan_on_flat_images_and_under_inference_mode(backbone) -> None:
    flat = torch.zeros(2, 3, 32, 48)
    ext = FungiPatchFeatures(backbone)
    with torch.inference_mode():
        out = ext(flat)
    assert torch.isfinite(out).all()
    assert ext(flat, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, ext.dim)


def dtypes_seen(ext: FungiPatchFeatures, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, set]]:
    """Features of `images` and the dtypes met inside: the gradient layer's output (the backbone's forward) and
    the per-token gradients and inputs handed to the projection."""
    seen: dict[str, set] = {"layer": set(), "projected": set()}
    handle = ext.layer.register_forward_hook(lambda module, inputs, output: seen["layer"].add(output.dtype))
    project = ext.projection.project_outer

    def recording(g, a):
        seen["projected"].update({g.dtype, a.dtype})
        return project(g, a)

    ext.projection.project_outer = recording
    try:
        return ext(images), seen
    finally:
        handle.remove()
        del ext.projection.project_outer


@pytest.mark.parametrize("projection", ["structured", "dense"])
def test_bf16_autocast_runs_in_bf16_and_stays_finite_and_close(backbone, images, projection: str) -> None:
    """autocast='bf16' (on CPU too): the backbone's linear layers and the gradient projection compute in bfloat16
    (the dtypes seen inside), the features come back float32, finite and close to the fp32 path, not equal."""
    half, inside = dtypes_seen(FungiPatchFeatures(backbone, projection=projection, autocast="bf16"), images)
    full, fp32 = dtypes_seen(FungiPatchFeatures(backbone, projection=projection, autocast="off",
                                                gradient_dtype="float32"), images)
    assert inside == {"layer": {torch.bfloat16}, "projected": {torch.bfloat16}}
    assert fp32 == {"layer": {torch.float32}, "projected": {torch.float32}}
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert F.cosine_similarity(half[..., 32:], full[..., 32:], dim=-1).min() > 0.999
    assert not torch.equal(half, full)  # bf16 rounding shows


@pytest.mark.parametrize("amx", [True, False])
def test_auto_gradient_dtype_follows_native_bf16_matmuls(backbone, images, amx: bool, monkeypatch) -> None:
    """gradient_dtype=auto on a CPU with AMX tiles (native bf16 matmuls): the backward after the layer runs in
    oneDNN's bf16 math mode and the projection in bf16; without AMX both stay fp32; the forward is fp32 either way
    and the math mode is restored after the call."""
    matmul = torch.backends.mkldnn.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no oneDNN fp32 math mode")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    before, modes = matmul.fp32_precision, set()
    handle = backbone.model.norm.register_full_backward_hook(lambda *args: modes.add(matmul.fp32_precision))
    try:
        _, inside = dtypes_seen(FungiPatchFeatures(backbone, autocast="off"), images)
    finally:
        handle.remove()
    assert inside == {"layer": {torch.float32}, "projected": {torch.bfloat16 if amx else torch.float32}}
    assert modes == {"bf16" if amx else before} and matmul.fp32_precision == before


def test_grad_weight_zero_gives_embeddings(backbone, images) -> None:
    ext = FungiPatchFeatures(backbone, grad_weight=0.0)
    out = ext(images)
    torch.testing.assert_close(out[..., :32], F.normalize(backbone(images), dim=-1), rtol=1e-5, atol=1e-6)
    assert out[..., 32:].abs().max() == 0


def test_registry_options_round_trip(backbone) -> None:
    ext = build_patch_features("fungi", backbone, {"projection": "dense", "out_dim": 16, "negatives": "support"})
    again = FungiPatchFeatures(backbone, **ext.options())
    assert again.options() == ext.options() and ext.dim == 48 and ext.needs_support
    assert ext.options()["head_dim"] == 96 and not FungiPatchFeatures(backbone).needs_support
    for bad in ({"negatives": "random"}, {"n_neg": 6}, {"layer": "blocks.0.norm1"}, {"projection": "kron"}):
        with pytest.raises(ConfigError):
            FungiPatchFeatures(backbone, **bad)


def test_loss_matches_hand_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    z, neg = torch.randn(1, 4, 3, generator=generator), torch.randn(1, 2, 3, generator=generator)
    keep = torch.tensor([[True, False]])
    for placement in ("positive", "both"):
        got = info_nce(z, TAU, placement, neg, keep)
        zn, nn_ = F.normalize(z[0], dim=-1), F.normalize(neg[0], dim=-1)
        div = TAU if placement == "both" else 1.0
        losses = []
        for i in range(4):
            others = [float(zn[i] @ zn[j]) for j in range(4) if j != i]
            columns = [float(zn[i] @ nn_[0])] + others  # the dropped negative is left out
            lse = math.log(sum(math.exp(c / div) for c in columns))
            losses.append(lse - sum(others) / 3 / TAU)
        assert got.shape == (1,) and abs(float(got[0]) - sum(losses) / 4) < 1e-5
    torch.testing.assert_close(info_nce(z, TAU, "positive", neg, None)[0], reference_loss(z[0], neg[0], TAU))


def test_scrambled_negatives_reproduce_reference_reshape() -> None:
    support = torch.arange(40.0).reshape(8, 5)  # M = 8 rows, E = 5
    ids = torch.tensor([[[3, 1, 6], [0, 7, 2]]])  # (B=1, T=2, K=3)
    fixed = gather_negatives(support, ids, n_neg=2)
    assert torch.equal(fixed[0, 1], support[[0, 7]])
    scrambled = gather_negatives(support, ids, n_neg=2, scrambled=True)
    for t in range(2):
        block = support[ids[0, t]].reshape(-1)  # the token's concatenated K*E values
        for n in range(2):
            for e in range(5):
                assert scrambled[0, t, n, e] == block[e * 3 + n]  # the reference's reshape bug: offset e*K + n
    reference = support[ids.reshape(-1)].reshape(1, 2, 5, 3).permute(0, 1, 3, 2)[:, :, :2]
    assert torch.equal(scrambled, reference)


def test_keep_mask_seeded() -> None:
    mask = keep_mask(1000, 0.5, seed=3, device=torch.device("cpu"))
    assert torch.equal(mask, keep_mask(1000, 0.5, seed=3, device=torch.device("cpu")))
    assert 400 < int(mask.sum()) < 600 and keep_mask(5, 1.0, 0, torch.device("cpu")).all()


@pytest.mark.parametrize("negatives", ["support", "support_scrambled"])
def test_support_negatives(backbone, images, negatives) -> None:
    with torch.no_grad():
        support = F.normalize(backbone(torch.randn(4, 3, 32, 48)).reshape(-1, 32), dim=-1)  # (96, E)
    ext = FungiPatchFeatures(backbone, negatives=negatives, n_neg=2, neg_k=3)
    with pytest.raises(RuntimeError):
        ext(images)
    ext.set_support(support)
    out = ext(images)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(ext(images[2:]), out[2:], rtol=1e-5, atol=1e-5)
    plain = FungiPatchFeatures(backbone)(images)
    assert not torch.allclose(out, plain)  # the negatives do reach the gradients
    assert F.cosine_similarity(out, plain, dim=-1).min() > 0.5


def test_support_negatives_skip_the_query_image(backbone, monkeypatch) -> None:
    """With its own rows in the support set, an image's negatives come from other images unless told not to."""
    torch.manual_seed(1)
    support_images = torch.randn(4, 3, 32, 48)
    with torch.no_grad():
        support = F.normalize(backbone(support_images).reshape(-1, 32), dim=-1)  # (4 x 24, E)
    row_images = torch.arange(4).repeat_interleave(24)
    ext = FungiPatchFeatures(backbone, projection="dense", negatives="support", neg_k=3, n_neg=2, keep_prob=1.0)
    ext.set_support(support, image_ids=row_images)
    ids = torch.tensor([0, 1])
    tokens = backbone.forward_tokens(support_images[:2])
    seen = []
    real_gather = gather_negatives

    def spy(support_rows, neighbour_ids, n_neg, scrambled=False):
        seen.append(neighbour_ids)
        return real_gather(support_rows, neighbour_ids, n_neg, scrambled)

    monkeypatch.setattr("hummingbird_fungi.features.fungi_patch.gather_negatives", spy)
    ext._negatives(tokens, ids)
    ext._negatives(tokens, None)
    monkeypatch.undo()
    excluded, kept = seen
    assert excluded.shape == kept.shape == (2, 25, 3)
    assert not (row_images[excluded] == ids.view(2, 1, 1)).any()
    assert torch.equal(kept[:, 1:, 0], torch.arange(48).view(2, 24))  # each patch token's nearest row is itself
    fungi = ext(support_images[:2], image_ids=ids)
    assert not torch.allclose(fungi, ext(support_images[:2]))
    torch.testing.assert_close(ext(support_images[1:2], image_ids=ids[1:]), fungi[1:], rtol=1e-5, atol=1e-5)
    off = FungiPatchFeatures(backbone, projection="dense", negatives="support", neg_k=3, n_neg=2, keep_prob=1.0,
                             exclude_same_image=False)
    off.set_support(support, image_ids=row_images)
    torch.testing.assert_close(off(support_images[:2], image_ids=ids), ext(support_images[:2]))
    with pytest.raises(ValueError, match="image ids"):
        ext.set_support(support, image_ids=row_images[:5])
