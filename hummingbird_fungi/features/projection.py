"""Seeded random projections of linear-layer gradients (docs/protocol.md#projection), shared by patch and image FUNGI.

A linear layer's gradient for one token is the outer product ``G = g ã^T`` with ``g`` the
gradient w.r.t. the layer output (E_out,) and ``ã = [a; 1]`` its input with a bias entry
(E_in + 1,). Flattened row-major (index ``i * (E_in + 1) + j``, bias column last) this is
the reference's ``vec([g a^T | g])``. Both projections here can project such an outer
product without ever forming it (`project_outer`) and can project explicit matrices
(`project_full`, e.g. gradients summed over tokens or views).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import Tensor

from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.registry import Registry
from hummingbird_fungi.runtime import generator

DENSE_GEN_ROWS = 16  # rows of P per seeded generator; part of P's definition
_WORK_ELEMENTS = 1 << 21  # floats in one intermediate block (8 MB in fp32; cache-friendly on CPU)


class GradientProjection(abc.ABC):
    """Maps flattened (E_out, E_in + 1) gradient matrices to `out_dim` numbers."""

    out_dim: int

    def __init__(self, out_dim: int, e_out: int, e_in: int, seed: int) -> None:
        if min(out_dim, e_out, e_in) < 1:
            raise ConfigError(f"projection sizes must be positive, got out_dim={out_dim}, "
                              f"e_out={e_out}, e_in={e_in}")
        self.out_dim, self.e_out, self.e_in, self.seed = out_dim, e_out, e_in, seed

    @abc.abstractmethod
    def project_outer(self, g: Tensor, a: Tensor) -> Tensor:
        """Project vec([g a^T | g]) for g (n, E_out), a (n, E_in) -> (n, out_dim) fp32, never forming it."""

    @abc.abstractmethod
    def project_full(self, G: Tensor) -> Tensor:
        """Project full gradient matrices G (n, E_out, E_in + 1), bias last column -> (n, out_dim)."""

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """Everything that defines the projection (recorded in manifests)."""

    def _check(self, g: Tensor, a: Tensor) -> None:
        """Refuse inputs whose sizes do not match the projection."""
        if g.shape[-1] != self.e_out or a.shape[-1] != self.e_in or g.shape[0] != a.shape[0]:
            raise ValueError(f"expected g (n, {self.e_out}) and a (n, {self.e_in}), "
                             f"got {tuple(g.shape)} and {tuple(a.shape)}")


class DenseSignProjection(GradientProjection):
    """The reference's dense P in {-1, +1}^(out_dim x E_out (E_in + 1)), scaled by 1/sqrt(out_dim).

    With out_dim = E this is the reference's c = 1/sqrt(E). P is generated on the CPU in
    blocks of `DENSE_GEN_ROWS` rows, block i from its own generator seeded by (seed, i), so
    any block can be regenerated alone. An int8 copy is kept (`cache`) on the device of the
    last call; P is never held whole in a floating type. `project_outer` works in blocks of
    `token_chunk` tokens and a bounded number of rows of P.
    """

    def __init__(self, out_dim: int, e_out: int, e_in: int, seed: int = 0, cache: bool = True,
                 token_chunk: int = 1024) -> None:
        super().__init__(out_dim, e_out, e_in, seed)
        self.cache, self.token_chunk = cache, token_chunk
        self.scale = 1.0 / math.sqrt(out_dim)
        self._int8: Tensor | None = None  # (out_dim, E_out, E_in + 1) int8

    @property
    def num_chunks(self) -> int:
        """Number of seeded row blocks of P."""
        return math.ceil(self.out_dim / DENSE_GEN_ROWS)

    def chunk(self, index: int) -> Tensor:
        """Row block `index` of P, regenerated from (seed, index): (rows, E_out, E_in + 1) int8 +-1."""
        if not 0 <= index < self.num_chunks:
            raise IndexError(f"chunk {index} out of range [0, {self.num_chunks})")
        rows = min(DENSE_GEN_ROWS, self.out_dim - index * DENSE_GEN_ROWS)
        bits = torch.randint(0, 2, (rows, self.e_out, self.e_in + 1), generator=generator(self.seed, index),
                             dtype=torch.int8)
        return bits * 2 - 1

    def _rows(self, start: int, stop: int, device: torch.device) -> Tensor:
        """Rows [start, stop) of P as int8 on `device`, from the cache or regenerated."""
        if self.cache:
            if self._int8 is None or self._int8.device != device:
                full = torch.cat([self.chunk(i) for i in range(self.num_chunks)])
                self._int8 = full.to(device)
            return self._int8[start:stop]
        first, last = start // DENSE_GEN_ROWS, (stop - 1) // DENSE_GEN_ROWS
        block = torch.cat([self.chunk(i) for i in range(first, last + 1)])
        offset = first * DENSE_GEN_ROWS
        return block[start - offset:stop - offset].to(device)

    def _row_step(self, tokens: int) -> int:
        """Rows of P per compute block, bounding both that block of P and the (tokens, rows E_out) product."""
        step = max(1, _WORK_ELEMENTS // (self.e_out * max(tokens, self.e_in + 1)))
        if not self.cache:  # regenerate whole seeded blocks, not fractions of them
            step = max(DENSE_GEN_ROWS, step - step % DENSE_GEN_ROWS)
        return min(step, self.out_dim)

    def project_outer(self, g: Tensor, a: Tensor) -> Tensor:
        """phi[k] = c g^T P3[k] ã per token: U = P3 a (a GEMM), g . U (a batched matrix-vector product) and the bias
        column's g . P3[k][:, -1] (a small GEMM), in blocks of rows of P and of tokens; fp32 out."""
        self._check(g, a)
        n = g.shape[0]
        a = a.to(g.dtype)
        out = g.new_empty(n, self.out_dim, dtype=torch.float32)
        step = self._row_step(min(n, self.token_chunk))
        buffer = g.new_empty(step, self.e_out, self.e_in + 1)
        for start in range(0, self.out_dim, step):
            stop = min(start + step, self.out_dim)
            p3 = buffer[:stop - start].copy_(self._rows(start, stop, g.device))  # (k, E_out, E_in + 1)
            weight = p3[..., :-1].reshape(-1, self.e_in)  # (k E_out, E_in), a view
            bias = p3[..., -1]  # (k, E_out)
            for t0 in range(0, n, self.token_chunk):
                t1 = min(t0 + self.token_chunk, n)
                u = (a[t0:t1] @ weight.T).view(t1 - t0, stop - start, self.e_out)  # (t, k, E_out)
                dots = torch.bmm(u, g[t0:t1, :, None]).squeeze(-1)  # (t, k)
                out[t0:t1, start:stop] = torch.addmm(dots, g[t0:t1], bias.T)
        return out * self.scale  # (n, out_dim)

    def project_full(self, G: Tensor) -> Tensor:
        """phi = c P vec(G), chunked over rows of P."""
        n = G.shape[0]
        if G.shape[1:] != (self.e_out, self.e_in + 1):
            raise ValueError(f"expected G (n, {self.e_out}, {self.e_in + 1}), got {tuple(G.shape)}")
        flat = G.reshape(n, -1)  # (n, E_out (E_in + 1))
        step = self._row_step(1)
        parts = [flat @ self._rows(s, min(s + step, self.out_dim), G.device).to(G.dtype).reshape(-1, flat.shape[1]).T
                 for s in range(0, self.out_dim, step)]
        return torch.cat(parts, dim=1) * self.scale

    def options(self) -> dict[str, Any]:
        return {"kind": "dense", "out_dim": self.out_dim, "seed": self.seed,
                "distribution": "sign", "gen_rows": DENSE_GEN_ROWS}


class StructuredProjection(GradientProjection):
    """Rank-R structured projection: phi[k] = c sum_r (u_kr . g)(v_kr . ã), c = 1/sqrt(out_dim R).

    Equivalent to a P whose row k is vec(sum_r u_kr v_kr^T); with random signs or Gaussians it
    preserves inner products of gradient matrices like the dense P (same expected squared
    norm), at 2 R out_dim (E_out + E_in + 1) FLOPs per token instead of 2 out_dim E_out (E_in + 1).
    The factors are drawn as columns k R + r and stored rank-major (column r out_dim + k), so the
    sum over r adds R contiguous blocks.
    """

    DISTRIBUTIONS = ("sign", "gaussian")

    def __init__(self, out_dim: int, e_out: int, e_in: int, seed: int = 0, rank: int = 4,
                 distribution: str = "sign", token_chunk: int = 1024) -> None:
        super().__init__(out_dim, e_out, e_in, seed)
        self.token_chunk = token_chunk
        if rank < 1:
            raise ConfigError(f"structured projection rank must be >= 1, got {rank}")
        if distribution not in self.DISTRIBUTIONS:
            raise ConfigError(f"unknown projection distribution {distribution!r}; choose one of {self.DISTRIBUTIONS}")
        self.rank, self.distribution = rank, distribution
        self.scale = 1.0 / math.sqrt(out_dim * rank)
        draws = generator(seed, rank)
        self.u = self._rank_major(self._draw((e_out, out_dim * rank), draws))  # (E_out, R out_dim)
        self.v = self._rank_major(self._draw((e_in + 1, out_dim * rank), draws))  # (E_in + 1, R out_dim)
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _draw(self, shape: tuple[int, int], generator: torch.Generator) -> Tensor:
        """Random factor matrix of `shape`, +-1 or standard normal."""
        if self.distribution == "gaussian":
            return torch.randn(shape, generator=generator)
        return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1

    def _rank_major(self, factor: Tensor) -> Tensor:
        """Columns k R + r -> r out_dim + k."""
        return factor.view(-1, self.out_dim, self.rank).transpose(1, 2).reshape(factor.shape[0], -1).contiguous()

    def _factors(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """u and v on the device and in the dtype of `like` (converted once, then cached)."""
        key = (like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = (self.u.to(like.device, like.dtype), self.v.to(like.device, like.dtype))
        return self._cast[key]

    def project_outer(self, g: Tensor, a: Tensor) -> Tensor:
        self._check(g, a)
        a = a.to(g.dtype)
        u, v = self._factors(g)
        out = g.new_empty(g.shape[0], self.out_dim, dtype=torch.float32)
        for t0 in range(0, g.shape[0], self.token_chunk):
            t1 = min(t0 + self.token_chunk, g.shape[0])
            left = g[t0:t1] @ u  # (t, R out)
            left.mul_(torch.addmm(v[-1], a[t0:t1], v[:-1]))  # (t, R out)
            torch.sum(left.view(t1 - t0, self.rank, self.out_dim), dim=1, dtype=torch.float32, out=out[t0:t1])
        return out.mul_(self.scale)  # (n, out_dim)

    def project_full(self, G: Tensor) -> Tensor:
        if G.shape[1:] != (self.e_out, self.e_in + 1):
            raise ValueError(f"expected G (n, {self.e_out}, {self.e_in + 1}), got {tuple(G.shape)}")
        u, v = self._factors(G)
        gv = G @ v  # (n, E_out, R out)
        return (gv * u).sum(1).view(-1, self.rank, self.out_dim).sum(1) * self.scale

    def options(self) -> dict[str, Any]:
        return {"kind": "structured", "out_dim": self.out_dim, "seed": self.seed,
                "rank": self.rank, "distribution": self.distribution}


PROJECTIONS: Registry[type[GradientProjection]] = Registry("gradient projection")
PROJECTIONS.register("dense")(DenseSignProjection)
PROJECTIONS.register("structured")(StructuredProjection)


def build_projection(kind: str, out_dim: int, e_out: int, e_in: int, seed: int,
                     **options: Any) -> GradientProjection:
    """Create a gradient projection by kind: 'dense' (reference) or 'structured' (rank R)."""
    return PROJECTIONS.get(kind)(out_dim, e_out, e_in, seed, **options)
