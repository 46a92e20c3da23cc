"""Multi-granular quantized embeddings: DPQ where rare ids choose among fewer centroids (shorter codes).

Kang, Cheng, Chen, Yi, Lin, Hong & Chi (Google), WWW 2020, "Learning Multi-granular Quantized Embeddings
for Large-Vocab Categorical Features in Recommender Systems". The ids of a compressed feature are split
by frequency into a HEAD block (the ``head_fraction`` most frequent ids) and a TAIL block (the rest). Both
quantize their ``D`` groups against the same codebook ``C`` (``D x K x s``, as in :mod:`.dpq`), but a
tail id may only use the first ``K_tail = max(2, K // tail_ratio)`` centroids of each group, so its codes
take ``ceil(log2 K_tail)`` bits instead of ``ceil(log2 K)``::

    counts ──► head ids (top head_fraction by count, ties by id)        tail ids (the rest, in id order)
               codes in [0, K)        ceil(log2 K) bits each             codes in [0, K_tail)   fewer bits
               stream codes0: |head id 0: c_1..c_D|head id 1: ...|       stream codes1: |tail id 0: ...|
                                          └────────── one codebook C[j, k], the tail uses k < K_tail ──┘

    id ──► head?  head_ids sorted: pos = searchsorted(head_ids, id); head = head_ids[pos] == id
           row  = pos (head)  or  id - pos (tail: pos is the number of head ids below the id)
    (no remap when the head is ids [0, h): no counts, or counts already in decreasing order)

Without ``FeatureSpec.counts`` (or with all-zero counts) id order is the popularity proxy: the head is
ids ``[0, h)``. Training is DPQ's (straight-through VQ, query table training-only, the same auxiliary
loss), with the tail's argmin restricted to its centroids. ``head_fraction = 0.1`` and ``tail_ratio = 4``
(e.g. K = 256 in the head, 64 in the tail) are our defaults, not numbers from the paper.

Memory (inference), with ``h`` head ids, ``b(K) = ceil(log2 K)``::

    ceil(h * D * b(K) / 8) + ceil((n - h) * D * b(K_tail) / 8) + K * d * 4 + remap
    remap = 0 (head = ids [0, h))  or  h * s(n)  (sorted head ids; s(n) = 4 bytes for n < 2**31, else 8)

Budget planning is DPQ's (:mod:`.dpq`) with these bytes, maximising the mean code bits per id,
``(h * D * log2 K + (n - h) * D * log2 K_tail) / n``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..config import register_method
from ..features import FeatureSpec
from .dpq import CodeLayout, DPQConfig, DPQEmbeddingBagCollection

__all__ = ["MGQEConfig", "MGQEEmbeddingBagCollection", "head_split"]

_SPLITS: dict[tuple[int, int, float], tuple[object, int, np.ndarray | None]] = {}


def head_split(feature: FeatureSpec, head_fraction: float) -> tuple[int, np.ndarray | None]:
    """``(h, head_ids)``: the size of the head block and its sorted ids, or ``None`` when they are ``[0, h)``.

    >>> f = FeatureSpec("a", 10, 4, counts=np.array([0, 9, 1, 1, 8, 0, 0, 0, 0, 0]))
    >>> head_split(f, 0.2)
    (2, array([1, 4], dtype=int32))
    >>> head_split(FeatureSpec("b", 10, 4), 0.25)
    (2, None)
    """
    n = feature.num_embeddings
    h = min(max(1, round(head_fraction * n)), n - 1) if n >= 2 else n
    counts = feature.counts
    if counts is None or n < 2:
        return h, None
    key = (id(counts), n, float(head_fraction))
    hit = _SPLITS.get(key)
    if hit is not None and hit[0] is counts:  # planning asks many times; argsort once per feature
        return hit[1], hit[2]
    head = None
    if np.any(counts):
        top = np.sort(np.argsort(-np.asarray(counts), kind="stable")[:h])
        if top[-1] >= h:  # the head is not ids [0, h): keep its sorted ids (the remap)
            head = top.astype(np.int32 if n <= 2**31 - 1 else np.int64)
    if len(_SPLITS) > 256:
        _SPLITS.clear()
    _SPLITS[key] = (counts, h, head)
    return h, head


@dataclasses.dataclass(frozen=True)
class MGQEConfig(DPQConfig):
    """Multi-granular quantized embeddings: DPQ with fewer centroids for the rare ids.

    Args (besides :class:`~embtable.DPQConfig`'s ``num_groups``, ``num_centroids`` (the head's ``K``),
    ``max_centroids`` and ``commitment``):
        head_fraction: share of a feature's ids (the most frequent) that use all ``K`` centroids.
        tail_ratio: the other ids use the first ``max(2, K // tail_ratio)`` centroids.
    """

    method = "mgqe"
    head_fraction: float = 0.1
    tail_ratio: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.head_fraction, int | float) and 0 < self.head_fraction < 1):
            raise ValueError(f"MGQEConfig.head_fraction must be in (0, 1) (share of ids in the head block), "
                             f"got {self.head_fraction!r}")
        if isinstance(self.tail_ratio, bool) or not isinstance(self.tail_ratio, int) or self.tail_ratio < 1:
            raise ValueError(f"MGQEConfig.tail_ratio must be an integer >= 1 (K_tail = K // tail_ratio), "
                             f"got {self.tail_ratio!r}")


@register_method(MGQEConfig)
class MGQEEmbeddingBagCollection(DPQEmbeddingBagCollection):
    """DPQ with a frequency-split code length (Kang et al., WWW 2020).

    >>> import embtable, torch
    >>> from torchrec import KeyedJaggedTensor
    >>> counts = np.random.default_rng(0).zipf(1.3, size=100_000).clip(max=10_000)
    >>> feats = [embtable.FeatureSpec("user", 100_000, 16, counts=counts)]
    >>> m = embtable.build(feats, MGQEConfig(), budget="1/16", seed=0)
    >>> m.config.num_groups, [(rows, k, b) for (rows, k), b in zip(m.quantizers[0].blocks, m.quantizers[0].bits)]
    ({'user': 8}, [(10000, 35, 6), (90000, 8, 3)])
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user"], torch.tensor([123, 7, 3]), torch.tensor([2, 1]))
    >>> served = m.inference_module()
    >>> torch.equal(served(kjt).values(), m.eval()(kjt).values())
    True
    """

    @classmethod
    def feature_layout(cls, feature: FeatureSpec, num_groups: int, num_centroids: int,
                       config: MGQEConfig) -> CodeLayout:
        h, head_ids = head_split(feature, config.head_fraction)
        if h >= feature.num_embeddings:  # a one-id feature: one block
            return CodeLayout(num_groups, num_centroids, ((feature.num_embeddings, num_centroids),))
        tail = max(2, num_centroids // config.tail_ratio)
        return CodeLayout(num_groups, num_centroids, ((h, num_centroids), (feature.num_embeddings - h, tail)),
                          head_ids)
