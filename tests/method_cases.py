"""How the contract suite exercises each registered method.

Every registered method must have a :class:`MethodCase` here (``test_every_method_is_covered`` fails
otherwise). A new method adds one entry: a compressing config and budget, the degenerate setting that
reduces it to a plain table, and configs that must be rejected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torchrec import EmbeddingBagCollection

import embtable
from embtable import FeatureSpec


@dataclasses.dataclass
class MethodCase:
    config: embtable.MethodConfig
    budget: object  # what build() takes; None = the config is already sized
    # Build the degenerate module that equals `ebc` (a plain EmbeddingBagCollection over `features`),
    # copy ebc's weights into it, and return it with pairs (module tensor, ebc tensor) whose gradients
    # must be equal. None: the method has no degenerate setting (say why in `why_no_degenerate`).
    degenerate: Callable[[list[FeatureSpec], EmbeddingBagCollection, dict], tuple[torch.nn.Module, list]] | None
    invalid: list[Callable[[], object]] = dataclasses.field(default_factory=list)  # each must raise ValueError
    huge_ids: bool = True  # can embed a feature with more than 2**32 ids at a small budget
    why_no_degenerate: str = ""
    # (config, budget) for the sharding test when the default has storage dims TorchRec's fused kernels
    # cannot shard (they need dims divisible by 4); None: shard `config` at `budget` as it is.
    sharded: tuple[embtable.MethodConfig, object] | None = None


def _weights(ebc: EmbeddingBagCollection) -> dict[str, torch.Tensor]:
    return {name: bag.weight for name, bag in ebc.embedding_bags.items()}


def _full_degenerate(features, ebc, build_kwargs):
    module = embtable.build(features, embtable.FullConfig(), **build_kwargs)
    module.storage.load_state_dict(ebc.state_dict())
    pairs = [(module.storage.embedding_bags[n].weight, w) for n, w in _weights(ebc).items()]
    return module, pairs


def _hash_degenerate(features, ebc, build_kwargs):
    config = embtable.HashConfig(num_buckets={f.name: f.num_embeddings for f in features}, hash_fn="modulo")
    module = embtable.build(features, config, **build_kwargs)
    module.storage.load_state_dict(ebc.state_dict())
    pairs = [(module.storage.embedding_bags[n].weight, w) for n, w in _weights(ebc).items()]
    return module, pairs


class _UnifiedFeatureRows:
    """One feature's rows in a unified module's logical table, laid out like its plain table [n, d].

    In the unshared identity layout, probe p of feature f owns logical rows [offset, offset + n) and holds
    columns [p*c, (p+1)*c); logical row r lives in table r % T at local row r // T. ``grad`` gathers the
    feature's gradient back from the round-robin tables, so it compares with the plain table's.
    """

    def __init__(self, module, offsets: list[int], n: int) -> None:
        self.tables = [module.storage.embedding_bags[k].weight for k in module.mapper.storage_keys]
        self.offsets, self.n = offsets, n

    def _logical(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        T = len(tensors)
        out = torch.empty(sum(t.shape[0] for t in tensors), tensors[0].shape[1])
        for t, rows in enumerate(tensors):
            out[t::T] = rows
        return out

    def load(self, weight: torch.Tensor) -> None:
        T, c = len(self.tables), weight.shape[1] // len(self.offsets)
        logical = self._logical([w.detach() for w in self.tables])
        for p, start in enumerate(self.offsets):
            logical[start:start + self.n] = weight.detach()[:, p * c:(p + 1) * c]
        with torch.no_grad():
            for t, w in enumerate(self.tables):
                w.copy_(logical[t::T])

    @property
    def grad(self) -> torch.Tensor:
        logical = self._logical([w.grad.to_dense() if w.grad.is_sparse else w.grad for w in self.tables])
        return torch.cat([logical[start:start + self.n] for start in self.offsets], dim=1)


def _unified_degenerate(features, ebc, build_kwargs):
    # num_rows = sum n_f * k_f: every (feature, probe) gets its own identity-mapped rows (the unshared
    # reference layout), here with 2 probes of half the dim and 2 round-robin tables
    k = 2
    config = embtable.UnifiedConfig(num_rows=sum(f.num_embeddings * k for f in features), num_probes=k, num_tables=2)
    module = embtable.build(features, config, **build_kwargs)
    pairs, offset = [], 0
    for f in features:
        rows = _UnifiedFeatureRows(module, [offset + p * f.num_embeddings for p in range(k)], f.num_embeddings)
        offset += k * f.num_embeddings
        rows.load(ebc.embedding_bags[f.name].weight)
        pairs.append((rows, ebc.embedding_bags[f.name].weight))
    return module, pairs


def _optembed_degenerate(features, ebc, build_kwargs):
    # every id kept, every field at its base dim: identity remap, a plain table
    config = embtable.OptEmbedConfig(num_kept={f.name: f.num_embeddings for f in features},
                                     dims={f.name: f.embedding_dim for f in features})
    module = embtable.build(features, config, **build_kwargs)
    module.storage.load_state_dict(ebc.state_dict())
    pairs = [(module.storage.embedding_bags[n].weight, w) for n, w in _weights(ebc).items()]
    return module, pairs


def _mixed_dim_degenerate(features, ebc, build_kwargs):
    # one block per feature at its base dim: plain tables, no projection, identity mapping
    config = embtable.MixedDimConfig(block_dims={f.name: (f.embedding_dim,) for f in features})
    module = embtable.build(features, config, **build_kwargs)
    assert not module.projections
    with torch.no_grad():
        for n, w in _weights(ebc).items():
            module.block_weight(n).copy_(w)  # the feature's rows inside its dim's stacked table
    pairs = [(_StackedRows(module, n), w) for n, w in _weights(ebc).items()]
    return module, pairs


class _StackedRows:
    """``.grad``: the gradient rows of one feature's slice of a mixed_dim stacked table."""

    def __init__(self, module, name):
        table, self.start, self.end = module.block_location(name)
        self.weight = module.storage.embedding_bags[table].weight

    @property
    def grad(self):
        g = self.weight.grad
        return (g.to_dense() if g.is_sparse else g)[self.start:self.end]


def _managed_collision_degenerate(features, ebc, build_kwargs):
    # n + 1 rows per feature, warm-started: every id owns its row (id i -> row i), row n is the unused miss row
    config = embtable.ManagedCollisionConfig(zch_size={f.name: f.num_embeddings + 1 for f in features})
    module = embtable.build(features, config, **build_kwargs)
    pairs = []
    with torch.no_grad():
        for n, w in _weights(ebc).items():
            module.table_weight(n)[:-1].copy_(w)
            pairs.append((_LeadingRows(module.table_weight(n), w.shape[0]), w))
    return module, pairs


class _LeadingRows:
    """``.grad``: the first ``n`` gradient rows of a table (a managed-collision table's owned rows)."""

    def __init__(self, weight, n):
        self.weight, self.n = weight, n

    @property
    def grad(self):
        g = self.weight.grad
        return (g.to_dense() if g.is_sparse else g)[:self.n]


def _qr_degenerate(features, ebc, build_kwargs):
    # one partition: every feature keeps its plain table under its own name, identity mapping
    module = embtable.build(features, embtable.QRConfig(num_partitions=1), **build_kwargs)
    module.storage.load_state_dict(ebc.state_dict())
    pairs = [(module.storage.embedding_bags[n].weight, w) for n, w in _weights(ebc).items()]
    return module, pairs


def _low_rank_degenerate(features, ebc, build_kwargs):
    # rank = dim with identity projections: the n x d table times I_d is the plain table
    config = embtable.LowRankConfig(rank={f.name: f.embedding_dim for f in features})
    module = embtable.build(features, config, **build_kwargs)
    module.storage.load_state_dict(ebc.state_dict())
    with torch.no_grad():
        for p in module.projections.values():
            p.copy_(torch.eye(p.shape[0]))
    pairs = [(module.storage.embedding_bags[n].weight, w) for n, w in _weights(ebc).items()]
    return module, pairs


def _low_precision_degenerate(features, ebc, build_kwargs):
    # fp32 rows, every row kept, identity (modulo) mapping: a plain TorchRec table
    config = embtable.LowPrecisionConfig(precision="fp32", hash_fn="modulo",
                                         num_buckets={f.name: f.num_embeddings for f in features})
    module = embtable.build(features, config, **build_kwargs)
    module.storage.load_state_dict(ebc.state_dict())
    pairs = [(module.storage.embedding_bags[n].weight, w) for n, w in _weights(ebc).items()]
    return module, pairs


class _RobeRows:
    """``.grad``: one feature's plain-table-shaped slice ``[n, d]`` of the robe array's gradient."""

    def __init__(self, module, start: int, n: int, d: int) -> None:
        self.weight, self.start, self.n, self.d = module.array.weight, start, n, d

    @property
    def grad(self):
        g = self.weight.grad
        return (g.to_dense() if g.is_sparse else g)[self.start:self.start + self.n * self.d].view(self.n, self.d)


def _robe_degenerate(features, ebc, build_kwargs):
    # identity offsets (start_f + id * d) with Z = d and M = sum n * d: the array holds every plain table
    # row after row, and no window wraps
    dim = features[0].embedding_dim
    config = embtable.RobeConfig(size=sum(f.num_embeddings * f.embedding_dim for f in features), block_size=dim,
                                 hash_fn="identity")
    module = embtable.build(features, config, **build_kwargs)
    pairs, start = [], 0
    with torch.no_grad():
        for f in features:
            size = f.num_embeddings * f.embedding_dim
            module.array.weight[start:start + size, 0] = ebc.embedding_bags[f.name].weight.reshape(-1)
            pairs.append((_RobeRows(module, start, f.num_embeddings, f.embedding_dim), ebc.embedding_bags[f.name].weight))
            start += size
    return module, pairs


def _cafe_degenerate(features, ebc, build_kwargs):
    # no hot rows and m = n hashed rows: every feature is a plain table with the identity mapping
    config = embtable.CafeConfig(hot_rows=0, hash_rows={f.name: f.num_embeddings for f in features})
    module = embtable.build(features, config, **build_kwargs)
    module.storage.load_state_dict(ebc.state_dict())
    pairs = [(module.storage.embedding_bags[n].weight, w) for n, w in _weights(ebc).items()]
    return module, pairs


def _pep_degenerate(features, ebc, build_kwargs):
    # pruning disabled (sigmoid(-inf) = 0) and every weight kept: the soft threshold is the identity
    config = embtable.PEPConfig(target_nnz=sum(f.num_embeddings * f.embedding_dim for f in features),
                                threshold_init=float("-inf"))
    module = embtable.build(features, config, **build_kwargs)
    with torch.no_grad():
        for n, w in _weights(ebc).items():
            module.table_weight(n).copy_(w)
    pairs = [(_PEPRows(module, n), w) for n, w in _weights(ebc).items()]
    return module, pairs


class _PEPRows:
    """``.grad``: a PEP feature's rows of its dim's flat training table's gradient, as an ``[n, d]`` table's."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    @property
    def grad(self):
        group, _, start, rows = self.module._slots[self.name]
        grad = self.module.tables[group.key].weight.grad
        return (grad.to_dense() if grad.is_sparse else grad)[start:start + rows]


class _TTCore1Rows:
    """``.grad``: a degenerate TT feature's core 1 ``[n, 1, d, 1]`` gradient as an ``[n, d]`` table's."""

    def __init__(self, cores):
        self.core = cores.core1

    @property
    def grad(self):
        return self.core.grad.view(self.core.shape[0], self.core.shape[2])


def _tt_rec_degenerate(features, ebc, build_kwargs):
    # n1 = n, n2 = n3 = 1, d1 = d, rank 1: row i = core1[i] (cores 2 and 3 are the scalar 1), no cache
    config = embtable.TTRecConfig(rank=1, row_factors={f.name: (f.num_embeddings, 1, 1) for f in features},
                                  dim_factors={f.name: (f.embedding_dim, 1, 1) for f in features})
    module = embtable.build(features, config, **build_kwargs)
    pairs = []
    with torch.no_grad():
        for f, cores in zip(features, module.cores):
            cores.core1.copy_(ebc.embedding_bags[f.name].weight.view(f.num_embeddings, 1, f.embedding_dim, 1))
            cores.core2.fill_(1.0)
            cores.core3.fill_(1.0)
            pairs.append((_TTCore1Rows(cores), ebc.embedding_bags[f.name].weight))
    return module, pairs


class _CodebookRows:
    """``.grad``: a dpq/mgqe codebook's gradient ``[1, n, d]`` as the plain table's ``[n, d]``."""

    def __init__(self, codebook):
        self.codebook = codebook

    @property
    def grad(self):
        return self.codebook.grad[0]


def _dpq_degenerate(features, ebc, build_kwargs, config_cls=embtable.DPQConfig, **knobs):
    # one group and K = n centroids that are the table's rows, query = the table: every id's nearest
    # centroid is its own row (identity codes), so the output is the plain table's and the task gradient
    # reaches the centroid (the row) and, straight through, the query row
    config = config_cls(num_groups=1, num_centroids={f.name: f.num_embeddings for f in features}, **knobs)
    module = embtable.build(features, config, **build_kwargs)
    pairs = []
    with torch.no_grad():
        for q in module.quantizers:
            weight = ebc.embedding_bags[q.name].weight
            q.codebook.copy_(weight[None])
            module.query_weight(q.name).copy_(weight)
            pairs += [(_CodebookRows(q.codebook), weight), (module.query_weight(q.name), weight)]
    return module, pairs


def _mgqe_degenerate(features, ebc, build_kwargs):
    # dpq's identity codes, with the tail allowed every centroid too (tail_ratio=1): the head/tail remap of
    # the zipf counts must still find each id's own row
    return _dpq_degenerate(features, ebc, build_kwargs, embtable.MGQEConfig, tail_ratio=1)


CASES: dict[str, MethodCase] = {
    "full": MethodCase(
        config=embtable.FullConfig(),
        budget=None,
        degenerate=_full_degenerate,
        huge_ids=False,
    ),
    "hash": MethodCase(
        config=embtable.HashConfig(),
        budget="1/4",
        degenerate=_hash_degenerate,
        invalid=[
            lambda: embtable.HashConfig(hash_fn="md5"),
            lambda: embtable.HashConfig(num_buckets=0),
            lambda: embtable.method_config_from_dict({"method": "hash", "buckets": 10}),
        ],
    ),
    "unified": MethodCase(
        config=embtable.UnifiedConfig(num_probes=2, num_tables=2),
        budget="1/4",
        degenerate=_unified_degenerate,
        invalid=[
            lambda: embtable.UnifiedConfig(num_probes=0),
            lambda: embtable.UnifiedConfig(num_rows=-5, num_probes=1),
            lambda: embtable.build([FeatureSpec("a", 10, 8)], embtable.UnifiedConfig(num_probes=3), budget=100),
            lambda: embtable.build([FeatureSpec("a", 10, 8), FeatureSpec("b", 10, 16)],
                                   embtable.UnifiedConfig(num_probes=1)),
            lambda: embtable.build([FeatureSpec("a", 10, 8)], embtable.UnifiedConfig(num_rows=11, num_probes=1)),
        ],
    ),
    "mixed_dim": MethodCase(
        # 3 popularity blocks per feature: the zipf counts are not in id order, so the id remap buffers
        # (here the "hot" lists) are part of the budget; num_blocks=1 is tested in tests/test_mixed_dim.py
        config=embtable.MixedDimConfig(num_blocks=3),
        budget="1/2",
        sharded=(embtable.MixedDimConfig(num_blocks=3, dim_multiple=4), "3/4"),
        degenerate=_mixed_dim_degenerate,
        invalid=[
            lambda: embtable.MixedDimConfig(alpha=-0.1),
            lambda: embtable.MixedDimConfig(num_blocks=0),
            lambda: embtable.MixedDimConfig(dim_multiple=0),
            lambda: embtable.MixedDimConfig(block_dims={"a": (0,)}),
            lambda: embtable.build([FeatureSpec("a", 10, 4)], embtable.MixedDimConfig(block_dims={"a": (8,)})),
            lambda: embtable.build([FeatureSpec("a", 1000, 4)], embtable.MixedDimConfig(num_blocks=2,
                                                                                          block_dims={"a": (4, 2, 1)})),
            lambda: embtable.build([FeatureSpec("a", 10, 4)], embtable.MixedDimConfig()),
        ],
        # a 2**33-id feature fits the 1 MiB budget with the hashed tail (tail="hash", the default): its
        # rarest ids share hashed rows
    ),
    "optembed": MethodCase(
        # pruned ids hash into 16 OOV rows here, so that distinct pruned ids (the huge-id check) differ;
        # oov_buckets=0 (zero vectors, the paper's choice) is covered in tests/test_optembed.py
        config=embtable.OptEmbedConfig(oov_buckets=16),
        budget="1/4",
        degenerate=_optembed_degenerate,
        invalid=[
            lambda: embtable.OptEmbedConfig(num_kept=0),
            lambda: embtable.OptEmbedConfig(oov_buckets=-1),
            lambda: embtable.OptEmbedConfig(remap="hashmap"),
            lambda: embtable.build([FeatureSpec("a", 10, 4)], embtable.OptEmbedConfig(dims=8)),
        ],
    ),
    "qr": MethodCase(
        # 3 partitions so the 2**33-id feature fits the 1 MiB budget of test_large_ids (3 tables of about
        # 2**11 rows; 2 partitions need 2 * 2**16.5 rows = 5.9 MB); k = 2 is covered in tests/test_qr.py
        config=embtable.QRConfig(num_partitions=3),
        budget="1/4",
        degenerate=_qr_degenerate,
        invalid=[
            lambda: embtable.QRConfig(combiner="max"),
            lambda: embtable.QRConfig(num_collisions=1),
            lambda: embtable.QRConfig(num_partitions=0),
            lambda: embtable.QRConfig(bag_mode="exact"),
            lambda: embtable.build([FeatureSpec("a", 100, 2)], embtable.QRConfig(num_partitions=3, combiner="concat",
                                                                                num_collisions=10)),
            lambda: embtable.build([FeatureSpec("a", 100, 4)], embtable.QRConfig()),
        ],
    ),
    "low_rank": MethodCase(
        # a rank step of a feature costs (n + d) * 4 bytes, 1/8 of its table at d = 8: with these three
        # features the reachable totals are coarse, so the budget is one the planner can fill (99.2%: ranks
        # a=4, c=1, b full); at "1/4" the best possible plan is 91.9% of the budget
        config=embtable.LowRankConfig(),
        budget=30_000,
        sharded=(embtable.LowRankConfig(rank=4), None),
        degenerate=_low_rank_degenerate,
        invalid=[
            lambda: embtable.LowRankConfig(rank=0),
            lambda: embtable.LowRankConfig(rank={"a": -1}),
            lambda: embtable.build([FeatureSpec("a", 100, 4)], embtable.LowRankConfig(rank=8)),
            lambda: embtable.build([FeatureSpec("a", 100, 4)], embtable.LowRankConfig()),
            lambda: embtable.build([FeatureSpec("a", 100, 4)], embtable.LowRankConfig(rank={"b": 2})),
        ],
        # 2**33 ids in a 1 MiB budget: the hashed tail (tail="hash", the default) stores a few thousand rows
        huge_ids=True,
    ),
    "managed_collision": MethodCase(
        # TorchRec's MCH modules (LFU); ids are admitted by warm start and by eviction at every training step
        config=embtable.ManagedCollisionConfig(),
        budget="1/4",
        degenerate=_managed_collision_degenerate,
        invalid=[
            lambda: embtable.ManagedCollisionConfig(zch_size=1),
            lambda: embtable.ManagedCollisionConfig(eviction_policy="fifo"),
            lambda: embtable.ManagedCollisionConfig(eviction_interval=0),
            lambda: embtable.build([FeatureSpec("a", 100, 4)], embtable.ManagedCollisionConfig()),
            lambda: embtable.build([FeatureSpec("a", 100, 4)], embtable.ManagedCollisionConfig(zch_size={"b": 2})),
        ],
    ),
    "low_precision": MethodCase(
        # int8 codes with a learned per-row step (ALPT; d + 4 bytes a row), hashed to fit 1/4; fp16, int4 and
        # the fitted scale/bias quantizer are covered in tests/test_low_precision.py
        config=embtable.LowPrecisionConfig(),
        budget="1/4",
        degenerate=_low_precision_degenerate,
        invalid=[
            lambda: embtable.LowPrecisionConfig(precision="int2"),
            lambda: embtable.LowPrecisionConfig(num_buckets=0),
            lambda: embtable.LowPrecisionConfig(optimizer="adam"),
            lambda: embtable.LowPrecisionConfig(lr=0.0),
            lambda: embtable.LowPrecisionConfig(step_size="lsq"),
        ],
    ),
    "pep": MethodCase(
        config=embtable.PEPConfig(),
        budget="1/4",
        degenerate=_pep_degenerate,
        invalid=[
            lambda: embtable.PEPConfig(target_nnz=0),
            lambda: embtable.PEPConfig(threshold_init=float("nan")),
            lambda: embtable.PEPConfig(retrain="never"),
            lambda: embtable.PEPConfig(check_every=0),
            lambda: embtable.PEPConfig(threshold_lr_scale=0.0),
            lambda: embtable.PEPConfig(prune_steps=-1),
            lambda: embtable.build([FeatureSpec("a", 10, 4)], embtable.PEPConfig()),
        ],
        # it trains dense tables: a 2**33-row table is not built in a unit test
        huge_ids=False,
    ),
    "tt_rec": MethodCase(
        config=embtable.TTRecConfig(),
        budget="1/4",
        degenerate=_tt_rec_degenerate,
        invalid=[
            lambda: embtable.TTRecConfig(rank=0),
            lambda: embtable.TTRecConfig(rank={"a": -1}),
            lambda: embtable.TTRecConfig(dim_factors=(2, 2)),
            lambda: embtable.TTRecConfig(cache_rows=-1),
            lambda: embtable.build([FeatureSpec("a", 100, 8)], embtable.TTRecConfig(rank=2, dim_factors=(2, 2, 3))),
            lambda: embtable.build([FeatureSpec("a", 100, 8)], embtable.TTRecConfig(rank=2,
                                                                                   row_factors={"a": (4, 4, 4)})),
            lambda: embtable.build([FeatureSpec("a", 100, 8)], embtable.TTRecConfig()),
        ],
    ),
    "dhe": MethodCase(
        config=embtable.DHEConfig(),
        budget="1/4",
        degenerate=None,
        why_no_degenerate="DHE has no table to reduce to: every id is decoded by an MLP from its hash encoding",
        invalid=[
            lambda: embtable.DHEConfig(encoding="binary"),
            lambda: embtable.DHEConfig(num_hashes=0),
            lambda: embtable.DHEConfig(num_layers=0),
            lambda: embtable.DHEConfig(encoding="gaussian", num_hashes=7),
            lambda: embtable.DHEConfig(hidden={"a": -1}),
            lambda: embtable.build([FeatureSpec("a", 100, 8)], embtable.DHEConfig()),
            lambda: embtable.build([FeatureSpec("a", 100, 8)], embtable.DHEConfig(hidden={"b": 4})),
        ],
    ),
    "dpq": MethodCase(
        # at 1/4 feature b (50 ids) stays a full table, a and c get 8 codes of 6-7 bits (99.9% of the budget)
        config=embtable.DPQConfig(),
        budget="1/4",
        degenerate=_dpq_degenerate,
        invalid=[
            lambda: embtable.DPQConfig(num_centroids=1),
            lambda: embtable.DPQConfig(num_centroids=2**17),
            lambda: embtable.DPQConfig(commitment=-1.0),
            lambda: embtable.build([FeatureSpec("a", 100, 8)], embtable.DPQConfig(num_groups=3, num_centroids=4)),
            lambda: embtable.build([FeatureSpec("a", 100, 8)], embtable.DPQConfig(num_centroids=4)),
            lambda: embtable.build([FeatureSpec("a", 100, 8)], embtable.DPQConfig()),
        ],
        # every id stores a code (>= 1 bit): 2**33 ids need 1 GiB of codes, over test_large_ids' 1 MiB
        huge_ids=False,
    ),
    "mgqe": MethodCase(
        # the zipf counts are not in id order, so each compressed feature pays for its head-id remap
        config=embtable.MGQEConfig(),
        budget="1/4",
        degenerate=_mgqe_degenerate,
        invalid=[
            lambda: embtable.MGQEConfig(head_fraction=0.0),
            lambda: embtable.MGQEConfig(head_fraction=1.5),
            lambda: embtable.MGQEConfig(tail_ratio=0),
            lambda: embtable.MGQEConfig(num_centroids={"a": 1}),
            lambda: embtable.build([FeatureSpec("a", 100, 8)], embtable.MGQEConfig(num_groups=3, num_centroids=4)),
        ],
        huge_ids=False,  # as dpq: every id stores a code
    ),
    "robe": MethodCase(
        # one shared circular array for all features: a dense parameter, replicated (data-parallel), not
        # sharded: shard() refuses it with the reason (sharding_unsupported)
        config=embtable.RobeConfig(),
        budget="1/4",
        degenerate=_robe_degenerate,
        invalid=[
            lambda: embtable.RobeConfig(block_size=0),
            lambda: embtable.RobeConfig(size=0),
            lambda: embtable.RobeConfig(size=4, block_size=8),
            lambda: embtable.RobeConfig(hash_fn="md5"),
            lambda: embtable.build([FeatureSpec("a", 10, 4)], embtable.RobeConfig()),
        ],
    ),
    "cafe": MethodCase(
        # hot rows found by the HotSketch (a training-only buffer) and hashed rows, one table per feature
        config=embtable.CafeConfig(),
        budget="1/4",
        degenerate=_cafe_degenerate,
        invalid=[
            lambda: embtable.CafeConfig(hot_fraction=1.0),
            lambda: embtable.CafeConfig(hot_rows=10),
            lambda: embtable.CafeConfig(hot_rows=-1, hash_rows=10),
            lambda: embtable.CafeConfig(hot_rows=1, hash_rows=0),
            lambda: embtable.CafeConfig(sketch_slots=0),
            lambda: embtable.CafeConfig(decay=0.0),
            lambda: embtable.CafeConfig(migrate_every=-1),
            lambda: embtable.CafeConfig(hash_fn="md5"),
            lambda: embtable.build([FeatureSpec("a", 10, 4)], embtable.CafeConfig()),
        ],
    ),
}
