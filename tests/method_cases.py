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


def _optembed_degenerate(features, ebc, build_kwargs):
    # every id kept, every field at its base dim: identity remap, a plain table
    config = embtable.OptEmbedConfig(num_kept={f.name: f.num_embeddings for f in features},
                                     dims={f.name: f.embedding_dim for f in features})
    module = embtable.build(features, config, **build_kwargs)
    module.storage.load_state_dict(ebc.state_dict())
    pairs = [(module.storage.embedding_bags[n].weight, w) for n, w in _weights(ebc).items()]
    return module, pairs

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
}
