"""Gradient projections: seeded determinism, chunk regeneration, outer-product identity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.features import projection as projection_module
from hummingbird_fungi.features.projection import (
    DENSE_GEN_ROWS,
    DenseSignProjection,
    StructuredProjection,
    build_projection,
)

E_OUT, E_IN, OUT = 6, 5, 20  # OUT is not a multiple of DENSE_GEN_ROWS on purpose


def dense_matrix(proj: DenseSignProjection) -> torch.Tensor:
    """The full dense P (out, E_out (E_in + 1)) assembled from its seeded chunks."""
    return torch.cat([proj.chunk(i) for i in range(proj.num_chunks)]).float().reshape(proj.out_dim, -1)


def outer(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Explicit per-token gradient matrices [g a^T | g]: (n, E_out, E_in + 1)."""
    a_tilde = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    return g[:, :, None] * a_tilde[:, None, :]


@pytest.fixture
def grads() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(7, E_OUT, generator=generator), torch.randn(7, E_IN, generator=generator)


def test_dense_is_seeded_sign_matrix() -> None:
    first, again = DenseSignProjection(OUT, E_OUT, E_IN, seed=3), DenseSignProjection(OUT, E_OUT, E_IN, seed=3)
    other = DenseSignProjection(OUT, E_OUT, E_IN, seed=4)
    matrix = dense_matrix(first)
    assert matrix.shape == (OUT, E_OUT * (E_IN + 1))
    assert set(matrix.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(matrix, dense_matrix(again))
    assert not torch.equal(matrix, dense_matrix(other))
    assert first.num_chunks == math.ceil(OUT / DENSE_GEN_ROWS)


def test_dense_chunk_regenerates_alone() -> None:
    proj = DenseSignProjection(OUT, E_OUT, E_IN, seed=1)
    last = proj.num_chunks - 1
    assert torch.equal(DenseSignProjection(OUT, E_OUT, E_IN, seed=1).chunk(last), proj.chunk(last))
    assert proj.chunk(last).shape == (OUT - last * DENSE_GEN_ROWS, E_OUT, E_IN + 1)
    with pytest.raises(IndexError):
        proj.chunk(proj.num_chunks)


@pytest.mark.parametrize("kind", ["dense", "structured"])
def test_outer_equals_full(kind: str, grads) -> None:
    g, a = grads
    proj = build_projection(kind, OUT, E_OUT, E_IN, seed=2)
    fast, full = proj.project_outer(g, a), proj.project_full(outer(g, a))
    assert fast.shape == (7, OUT)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_dense_matches_explicit_matrix(grads) -> None:
    g, a = grads
    proj = DenseSignProjection(OUT, E_OUT, E_IN, seed=5)
    expected = outer(g, a).reshape(7, -1) @ dense_matrix(proj).T / math.sqrt(OUT)
    torch.testing.assert_close(proj.project_outer(g, a), expected, rtol=1e-5, atol=1e-5)


def test_dense_blocking_and_cache_do_not_change_result(grads, monkeypatch) -> None:
    g, a = grads
    reference = DenseSignProjection(OUT, E_OUT, E_IN, seed=6).project_outer(g, a)
    monkeypatch.setattr(projection_module, "_WORK_ELEMENTS", 1)  # one row of P per block
    for proj in (DenseSignProjection(OUT, E_OUT, E_IN, seed=6, token_chunk=3),
                 DenseSignProjection(OUT, E_OUT, E_IN, seed=6, cache=False, token_chunk=2)):
        torch.testing.assert_close(proj.project_outer(g, a), reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(proj.project_full(outer(g, a)), reference, rtol=1e-5, atol=1e-6)


def test_structured_is_rank_r_matrix(grads) -> None:
    g, a = grads
    proj = StructuredProjection(OUT, E_OUT, E_IN, seed=0, rank=3)
    u = proj.u.T.reshape(3, OUT, E_OUT).transpose(0, 1)  # (out, R, E_out); stored rank-major
    v = proj.v.T.reshape(3, OUT, E_IN + 1).transpose(0, 1)
    matrix = torch.einsum("kri,krj->kij", u, v).reshape(OUT, -1) / math.sqrt(OUT * 3)
    torch.testing.assert_close(proj.project_outer(g, a), outer(g, a).reshape(7, -1) @ matrix.T,
                               rtol=1e-5, atol=1e-5)
    assert set(proj.u.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("distribution", ["sign", "gaussian"])
def test_structured_seeded(distribution: str, grads) -> None:
    g, a = grads
    make = lambda seed: StructuredProjection(OUT, E_OUT, E_IN, seed=seed, distribution=distribution)  # noqa: E731
    assert torch.equal(make(1).project_outer(g, a), make(1).project_outer(g, a))
    assert not torch.equal(make(1).project_outer(g, a), make(2).project_outer(g, a))


@pytest.mark.parametrize("kind", ["dense", "structured"])
def test_projection_preserves_gradient_cosine(kind: str) -> None:
    generator = torch.Generator().manual_seed(1)
    g, a = torch.randn(2, 8, generator=generator), torch.randn(2, 7, generator=generator)
    g[1] = g[0] + 0.5 * g[1]
    a[1] = a[0] + 0.5 * a[1]
    full = outer(g, a).reshape(2, -1)
    phi = build_projection(kind, 2048, 8, 7, seed=0).project_outer(g, a)
    true_cos = F.cosine_similarity(full[0], full[1], dim=0)
    assert abs(F.cosine_similarity(phi[0], phi[1], dim=0) - true_cos) < 0.05
    assert abs(phi.norm(dim=1) / full.norm(dim=1) - 1).max() < 0.1


def test_options_and_errors() -> None:
    assert build_projection("structured", 4, 3, 2, seed=7, rank=2).options() == {
        "kind": "structured", "out_dim": 4, "seed": 7, "rank": 2, "distribution": "sign"}
    assert build_projection("dense", 4, 3, 2, seed=7).options()["kind"] == "dense"
    with pytest.raises(ConfigError):
        build_projection("kronecker", 4, 3, 2, seed=0)
    with pytest.raises(ConfigError):
        build_projection("structured", 4, 3, 2, seed=0, rank=0)
    with pytest.raises(ValueError):
        build_projection("dense", 4, 3, 2, seed=0).project_outer(torch.zeros(1, 2), torch.zeros(1, 2))
