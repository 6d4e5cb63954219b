"""Label transfer: retrieve each patch's neighbours and average their soft labels (docs/protocol.md#label-transfer)."""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence, cast, get_args

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hummingbird_fungi.config.schema import RetrievalOptions, Rescore, TransferOptions, rescore_mode
from hummingbird_fungi.errors import ConfigError
from hummingbird_fungi.memory.bank import MemoryBank
from hummingbird_fungi.retrieval.indexes import ExactIndex, FaissTrainedIndex, Index, build_index
from hummingbird_fungi.runtime import timed

log = logging.getLogger(__name__)

GATHER_ELEMENTS = 1 << 25  # 128 MB of float32 candidate features per re-scoring step
VOTE_ELEMENTS = 1 << 24  # 64 MB of float32 neighbour soft labels (rows, k, C) per vote step
NORM_EPS = 1e-12  # F.normalize's floor on a norm: a zero row has cosine 0 with everything
Setting = tuple[int, float]  # (k, temperature) of one vote


class ExtraCandidates(Protocol):
    """Neighbours from outside the bank (video: propagated frames), merged with the bank's before the vote; with an
    `exclusive` attribute that is true they replace the bank's (the bank is not searched)."""

    def candidates(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The k best (cosines (n, k), soft labels (n, k, C)) for queries (n, D), or None when there are none."""


def cosine_similarities(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine of each query with its neighbours: (n, D), (n, k, D) -> (n, k); zero rows give 0."""
    return torch.einsum("nd,nkd->nk", F.normalize(query.float(), dim=-1), F.normalize(keys.float(), dim=-1))


def aggregate_labels(weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Weighted sum of neighbour soft labels: (n, k), (n, k, C) -> (n, C)."""
    return torch.einsum("nk,nkc->nc", weights, labels)


def vote(sims: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Neighbour cosines (n, k) (-inf: no neighbour) and their soft labels (n, k, C) -> class distributions (n, C),
    weighted by softmax(cosine / temperature); a query without any neighbour gets an all-zero row."""
    return aggregate_labels(torch.softmax(sims / temperature, dim=-1).nan_to_num(0.0), labels)


class LabelTransfer:
    """Patch features -> class distributions by k-NN retrieval from a memory bank.

    Neighbour weights use cosines (`rescore`): 'always' recomputes them from the bank's stored
    features (the reference), 'never' takes the index's scores as they are, and 'auto' (default)
    recomputes them only when the index's scores are not exact (approximate backends, rows held at
    lower precision than stored); otherwise the exact index's inner products are divided by the query
    and row norms, the same cosines without reading the rows back. `rerank` > k asks an approximate index
    for that many candidates and keeps the k best by exact cosine, read from the (memory-mapped) bank.
    One search answers several (k, temperature) settings (`vote_settings`); extra
    candidates (`ExtraCandidates`, e.g. propagated video frames) join the bank's before the vote.
    """

    def __init__(self, bank: MemoryBank, index: Index, k: int = 30, temperature: float = 0.02,
                 rescore: Rescore | bool = "auto", rerank: int = 0) -> None:
        if k > bank.count:
            log.warning("k=%d exceeds the %d rows of the memory bank; using k=%d", k, bank.count, bank.count)
            k = bank.count
        mode = rescore_mode(rescore)
        if mode not in get_args(Rescore):
            raise ConfigError(f"transfer.rescore={rescore!r}: choose one of {', '.join(get_args(Rescore))}")
        self.bank, self.index, self.k, self.temperature = bank, index, k, temperature
        self.rescore, self.rerank = mode, min(max(rerank, k), bank.count)
        self.timings: dict[str, float] | None = None  # when set: seconds of search_s and vote_s (search included)

    @classmethod
    def from_bank(cls, bank: MemoryBank, backend: str = "exact", k: int = 30, temperature: float = 0.02,
                  rescore: Rescore | bool = "auto", rerank: int = 0, **options: Any) -> "LabelTransfer":
        """Index `bank` block by block with `backend` (trained indexes first fit a uniform sample), then wrap it."""
        index = build_index(backend, bank.dim, **options)
        if isinstance(index, FaissTrainedIndex) and bank.count > index.train_size:
            index.fit(bank.sample_features(index.train_size))  # not just the first shards
        for block in tqdm(list(bank.feature_chunks()), desc=f"index ({backend})", unit="shard",
                          disable=len(bank.feature_blocks) < 4):
            index.add(block)
        return cls(bank, index, k=k, temperature=temperature, rescore=rescore, rerank=rerank)

    @classmethod
    def from_options(cls, bank: MemoryBank, retrieval: RetrievalOptions | None = None,
                     transfer: TransferOptions | None = None) -> "LabelTransfer":
        """The label transfer of the `retrieval` and `transfer` sections over `bank`."""
        retrieval, transfer = retrieval or RetrievalOptions(), transfer or TransferOptions()
        return cls.from_bank(bank, retrieval.backend, k=retrieval.k, temperature=transfer.temperature,
                             rescore=transfer.rescore, rerank=transfer.rerank, **retrieval.options)

    @property
    def regathers(self) -> bool:
        """Whether neighbour cosines are recomputed from the bank's stored rows (`rescore`, `rerank`)."""
        return self.rescore == "always" or self.rerank > self.k or (
            self.rescore == "auto" and not self.index.exact_scores)

    @property
    def setting(self) -> Setting:
        """This transfer's own (k, temperature)."""
        return self.k, self.temperature

    def neighbours(self, flat: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, D) queries -> similarities (n, k) (-inf where the index found none) and row ids (n, k)."""
        k = self.k if k is None else min(k, self.bank.count)
        with timed(self.timings, "search_s"):
            scores, ids = self.index.search(flat, max(self.rerank, k))  # (n, k') with k' >= k
        return self.refine(flat, scores, ids, k)

    def refine(self, flat: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor,
               k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Index answers (n, k') for queries (n, D) -> the k best (n, k), rescored from the bank when asked."""
        k = self.k if k is None else k
        # gathered candidate features (rows, k', D) stay under GATHER_ELEMENTS floats at a time
        step = max(1, GATHER_ELEMENTS // (ids.shape[1] * flat.shape[1]))
        parts = [self._best(flat[i:i + step], scores[i:i + step], ids[i:i + step], k)
                 for i in range(0, len(flat), step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _best(self, flat: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines of candidates (n, k') of queries (n, D) as `rescore` says, and the k best."""
        missing = ids < 0
        ids = ids.clamp_min(0)
        if self.regathers:
            scores = cosine_similarities(flat, self.bank.gather_features(ids))
        elif self.rescore == "auto":  # exact inner products over the norms: the same cosines, no rows read
            row_norms = cast(ExactIndex, self.index).row_norms()[ids]  # (n, k')
            norms = flat.norm(dim=1, keepdim=True).clamp_min(NORM_EPS) * row_norms.clamp_min(NORM_EPS)
            scores = scores / norms
        scores = scores.masked_fill(missing, float("-inf"))
        if scores.shape[1] > k:
            scores, order = scores.topk(k, dim=1)
            ids = torch.gather(ids, 1, order)
        return scores, ids

    def candidates(self, flat: torch.Tensor, k: int | None = None,
                   extra: ExtraCandidates | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best neighbours of queries (n, D): cosines (n, k) and soft labels (n, k, C), `extra`'s merged in."""
        k = self.k if k is None else k
        if getattr(extra, "exclusive", False):
            return extra.candidates(flat, k)
        sims, ids = self.neighbours(flat, k)
        labels = self.bank.gather_labels(ids)  # (n, k, C)
        more = None if extra is None else extra.candidates(flat, k)
        if more is not None:
            sims, order = torch.cat([sims, more[0]], dim=1).topk(k, dim=1)
            labels = torch.gather(torch.cat([labels, more[1]], dim=1), 1,
                                  order[..., None].expand(-1, -1, labels.shape[-1]))
        return sims, labels

    def vote_settings(self, features: torch.Tensor, settings: Sequence[Setting] | None = None,
                      extra: ExtraCandidates | None = None) -> dict[Setting, torch.Tensor]:
        """(B, N, D) query features -> {(k, T): (B, N, C) class distributions}, every setting from one search
        of the largest k (default: this transfer's own setting).

        Without `extra` the B*N queries go through search, soft-label gather and vote in steps of at most
        VOTE_ELEMENTS gathered label values, so memory stays flat in the number of queries (`extra` may
        depend on the query positions, so it sees all of them at once)."""
        settings = list(settings or [self.setting])
        batch, num, dim = features.shape
        flat = features.reshape(-1, dim).float().cpu()
        widest = min(max(k for k, _ in settings), self.bank.count)
        step = len(flat) if extra is not None else max(1, VOTE_ELEMENTS // (widest * self.bank.num_classes))
        parts = [self._vote_rows(flat[i:i + step], settings, widest, extra) for i in range(0, len(flat), step)]
        return {s: torch.cat([part[s] for part in parts]).reshape(batch, num, -1) for s in settings}

    def _vote_rows(self, flat: torch.Tensor, settings: Sequence[Setting], widest: int,
                   extra: ExtraCandidates | None) -> dict[Setting, torch.Tensor]:
        """Queries (n, D) -> {(k, T): (n, C)} from one search of `widest` neighbours."""
        with timed(self.timings, "vote_s"):
            sims, labels = self.candidates(flat, widest, extra)
            out = {}
            for k, temperature in settings:
                top_sims, top_labels = sims, labels
                if min(k, self.bank.count) < sims.shape[1]:  # the k best of the widest answer
                    top_sims, order = sims.topk(k, dim=1)
                    top_labels = torch.gather(labels, 1, order[..., None].expand(-1, -1, labels.shape[-1]))
                out[(k, temperature)] = vote(top_sims, top_labels, temperature)
        return out

    def __call__(self, features: torch.Tensor, extra: ExtraCandidates | None = None) -> torch.Tensor:
        """(B, N, D) query features -> (B, N, C) class distributions at this transfer's own setting."""
        return self.vote_settings(features, [self.setting], extra)[self.setting]


def patch_probs_to_map(probs: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, C) row-major patch distributions -> (C, h, w)."""
    return probs.reshape(grid[0], grid[1], -1).permute(2, 0, 1)


def upsample_probs(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (C, h, w) -> (C, H, W)."""
    return F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def upsample_argmax(maps: torch.Tensor, size: tuple[int, int], class_chunk: int = 32) -> torch.Tensor:
    """argmax over classes of the bilinearly upsampled (C, h, w) maps -> (H, W) int64.

    Upsamples `class_chunk` classes at a time (interpolation is per channel, so this is
    exact) and keeps a running maximum; ties go to the lowest class id, as torch.argmax.
    """
    best_value = best_class = None
    for start in range(0, maps.shape[0], class_chunk):
        up = upsample_probs(maps[start:start + class_chunk], size)  # (c, H, W)
        value, cls = up.max(0)
        cls = cls + start
        if best_value is None:
            best_value, best_class = value, cls
        else:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_class = torch.where(better, cls, best_class)
    return best_class
