"""``compress(model, budget, method)``: swap compressed tables into an existing PyTorch recommender.

The model is walked for its embedding tables (``nn.Embedding``, ``nn.EmbeddingBag``, TorchRec
``EmbeddingBagCollection`` and ``EmbeddingCollection``, a module reachable under several names counted
once); ONE budget is planned across all of them with the method's own planner (small tables stay full);
each table module is replaced by an embtable module with the same call signature and output shapes:

    ==========================  ==================================================================
    found                       replaced by
    ==========================  ==================================================================
    ``nn.Embedding``            :class:`embtable.Embedding`
    ``nn.EmbeddingBag``         :class:`embtable.EmbeddingBag` (same mode, ``include_last_offset``)
    ``EmbeddingBagCollection``  the method's collection (:func:`embtable.build`); when a table serves
                                several features: :class:`embtable.grouped.GroupedEmbeddingBagCollection`
    ``EmbeddingCollection``     :class:`embtable.grouped.GroupedEmbeddingCollection`
    ==========================  ==================================================================

The model's own ``forward`` is untouched: only its submodules are swapped. What cannot be honoured
(``max_norm``, ``scale_grad_by_freq``, ``mode="max"``, non-fp32 tables, weights tied to another module)
is an error that names the table and the fix, or with ``on_unsupported="skip"`` a table
left full and listed with its reason in the report; nothing is dropped silently. A ``padding_idx`` is
kept, for every method: the new module reads an exact zero vector for that id (a bag leaves it out) and
never trains it, without storing anything more.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingCollection,
    get_embedding_names_by_table,
)

from .budget import FP32, Budget, BudgetError, as_budget, largest_feasible, plan
from .build import build
from .config import MethodConfig, Pooling, config_class, method_class
from .features import FeatureSpec
from .grouped import GroupedEmbeddingBagCollection, GroupedEmbeddingCollection, TableFeatures
from .memory import memory_report, sparse_parameters
from .methods.full import FullConfig
from .module import EmbeddingModule
from .single import Embedding, EmbeddingBag

__all__ = ["compress", "find_tables", "CompressionReport", "TableReport", "EMBTABLE_MODULES"]

# modules that already are embtable's: compress() leaves them (and what is inside them) alone
EMBTABLE_MODULES = (EmbeddingModule, Embedding, EmbeddingBag, GroupedEmbeddingBagCollection,
                    GroupedEmbeddingCollection)


@dataclasses.dataclass(frozen=True)
class TableReport:
    """One embedding table of the model: what it was and what it became.

    Attributes:
        key: the table's name in the report, plan and ``exclude``: the module path, plus ``/table`` for a
            table inside a TorchRec collection.
        kind: ``Embedding``, ``EmbeddingBag``, ``EmbeddingBagCollection`` or ``EmbeddingCollection``.
        paths: every path the module is reachable under (a module shared by several attributes).
        feature_names: the features looked up in it (TorchRec collections; else empty).
        status: ``compressed``, ``full`` (the planner kept it whole), ``excluded`` or ``skipped``.
        rows, dim: the stored rows and dim after (the method's storage for this table).
        bytes_before, bytes_after: exact inference bytes of the table before and after.
        detail: the plan's description, or why the table was skipped.
        init: how the new rows were initialised.
    """

    key: str
    kind: str
    paths: tuple[str, ...]
    feature_names: tuple[str, ...]
    num_embeddings: int
    embedding_dim: int
    method: str
    status: str
    rows: int
    dim: int
    bytes_before: int
    bytes_after: int
    detail: str = ""
    init: str = ""


@dataclasses.dataclass(frozen=True)
class CompressionReport:
    """What :func:`compress` planned (and, unless ``dry_run``, did), table by table.

    ``bytes_after`` (all tables, plus tensors a method shares across a module's tables) never exceeds
    ``budget_bytes``; without a dry run it equals the measured :func:`embtable.memory_report` of the new
    table modules plus the tables left as they were.
    """

    method: str
    config: dict[str, Any]
    budget_bytes: int | None
    planning: str  # "global" (one plan over all tables) or "per module" (a byte cap per module)
    tables: tuple[TableReport, ...]
    shared: dict[str, int]
    dry_run: bool
    notes: tuple[str, ...] = ()

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tables)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tables) + sum(self.shared.values())

    @property
    def skipped(self) -> dict[str, str]:
        """Tables left as they were because they cannot be compressed: key -> reason."""
        return {t.key: t.detail for t in self.tables if t.status == "skipped"}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "config": self.config, "budget_bytes": self.budget_bytes,
            "planning": self.planning, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "tables": [dataclasses.asdict(t) for t in self.tables], "shared": dict(self.shared),
            "dry_run": self.dry_run, "notes": list(self.notes),
        }

    def table(self) -> str:
        """A readable per-table report."""
        width = max([len(t.key) for t in self.tables] + [5])
        lines = [f"{'table':<{width}} {'kind':<22}{'rows':>12}{'dim':>5} {'method':<9}{'status':<11}"
                 f"{'rows after':>12}{'dim':>5}{'bytes before':>15}{'bytes after':>15}  detail"]
        for t in self.tables:
            lines.append(
                f"{t.key:<{width}} {t.kind:<22}{t.num_embeddings:>12,}{t.embedding_dim:>5} {t.method:<9}"
                f"{t.status:<11}{t.rows:>12,}{t.dim:>5}{t.bytes_before:>15,}{t.bytes_after:>15,}  {t.detail}"
            )
        for name, nbytes in self.shared.items():
            lines.append(f"{name:<{width}} {'(shared tensors)':<22}{'':>54}{nbytes:>15,}")
        budget = "none" if self.budget_bytes is None else f"{self.budget_bytes:,} B"
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 0.0
        lines.append(
            f"total {self.bytes_before:,} B -> {self.bytes_after:,} B ({ratio:.2%}); budget {budget}; "
            f"planning {self.planning}{'; DRY RUN (model unchanged)' if self.dry_run else ''}"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------------------
# finding the tables
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Table:
    key: str
    local: str  # the feature name inside the replacement module
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple[str, ...]
    embedding_names: tuple[str, ...]
    weight: torch.Tensor

    @property
    def full_bytes(self) -> int:
        return self.num_embeddings * self.embedding_dim * self.weight.element_size()


@dataclasses.dataclass
class _Site:
    """One table module of the model (reachable under one or more paths)."""

    module: nn.Module
    paths: list[str]
    kind: str
    tables: list[_Table]
    problems: list[str]
    grouped: bool = False  # an EBC whose tables need the grouped adapter

    @property
    def path(self) -> str:
        return self.paths[0]

    @property
    def device(self) -> torch.device:
        return self.tables[0].weight.device


def _identifier(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name) or "table"


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _table_problems(module: nn.Module) -> list[str]:
    """Settings of an nn.Embedding / nn.EmbeddingBag a compressed table cannot honour."""
    problems = []
    if getattr(module, "max_norm", None) is not None:
        problems.append(
            f"max_norm={module.max_norm}: renormalising looked-up rows in place is not defined for shared or "
            "factorised rows"
        )
    if getattr(module, "scale_grad_by_freq", False):
        problems.append("scale_grad_by_freq=True: gradient scaling by id frequency in the batch is not supported")
    if isinstance(module, nn.EmbeddingBag) and module.mode not in ("sum", "mean"):
        problems.append(f"mode={module.mode!r}: compressed bags pool with 'sum' or 'mean' only")
    if module.weight.dtype != torch.float32:
        problems.append(
            f"weights are {module.weight.dtype}: embtable trains fp32 rows (quantise at export instead)"
        )
    return problems


def _collection_tables(path: str, module: nn.Module, pooled: bool) -> tuple[list[_Table], list[str], bool]:
    configs = module.embedding_bag_configs() if pooled else module.embedding_configs()
    leaves = module.embedding_bags if pooled else module.embeddings
    names_by_table = get_embedding_names_by_table(configs)
    problems = []
    poolings = {c.pooling for c in configs} if pooled else {PoolingType.SUM}
    if len(poolings) > 1:
        problems.append(f"tables pool differently ({sorted(p.value for p in poolings)}); one module pools one way")
    elif pooled and next(iter(poolings)) not in (PoolingType.SUM, PoolingType.MEAN):
        problems.append(f"pooling {next(iter(poolings)).value}: compressed bags pool with SUM or MEAN only")
    tables = []
    for c, names in zip(configs, names_by_table):
        if c.data_type != DataType.FP32:
            problems.append(f"table {c.name!r} stores {c.data_type.value}: embtable trains fp32 rows")
        key = f"{path}/{c.name}" if path else c.name
        tables.append(_Table(key, _identifier(c.name), c.num_embeddings, c.embedding_dim, tuple(c.feature_names),
                             tuple(names), leaves[c.name].weight))
    features = [f for t in tables for f in t.feature_names]
    simple = (
        all(len(t.feature_names) == 1 for t in tables)
        and len(set(features)) == len(features)
        and all(re.fullmatch(r"[A-Za-z_][0-9A-Za-z_]*", f) for f in features)
    )
    if simple:  # one feature per table: the method's own collection, keyed by feature name
        for t in tables:
            t.local = t.feature_names[0]
    return tables, problems, not (simple and pooled)


def _own_forward(module: nn.Module) -> list[str]:
    """A subclass that overrides ``forward`` does something compress() cannot know: refuse it."""
    for base in (nn.Embedding, nn.EmbeddingBag, EmbeddingBagCollection, EmbeddingCollection):
        if isinstance(module, base) and type(module).forward is not base.forward:
            return [f"{type(module).__qualname__} overrides {base.__name__}.forward; a compressed table would "
                    "drop what that forward adds"]
    return []


def _find_sites(model: nn.Module) -> tuple[list[_Site], list[str]]:
    sites: dict[int, _Site] = {}
    covered: list[str] = []
    notes = []
    for path, module in model.named_modules(remove_duplicate=False):
        if any(_under(path, c) for c in covered):
            continue
        if id(module) in sites:  # the same module under another name
            sites[id(module)].paths.append(path)
            covered.append(path)
            continue
        if isinstance(module, EMBTABLE_MODULES):
            notes.append(f"{path or '<model>'} is already an embtable {type(module).__name__}: left as it is")
            covered.append(path)
            continue
        if isinstance(module, EmbeddingBagCollection | EmbeddingCollection):
            pooled = isinstance(module, EmbeddingBagCollection)
            tables, problems, grouped = _collection_tables(path, module, pooled)
            kind = "EmbeddingBagCollection" if pooled else "EmbeddingCollection"
            sites[id(module)] = _Site(module, [path], kind, tables, problems + _own_forward(module), grouped)
        elif isinstance(module, nn.Embedding | nn.EmbeddingBag):
            kind = type(module).__name__ if type(module) in (nn.Embedding, nn.EmbeddingBag) else (
                "Embedding" if isinstance(module, nn.Embedding) else "EmbeddingBag")
            n, d = module.weight.shape
            table = _Table(path or "<model>", _identifier(path or "table"), n, d, (), (), module.weight)
            sites[id(module)] = _Site(module, [path], kind, [table], _table_problems(module) + _own_forward(module))
        else:
            continue
        covered.append(path)
    found = list(sites.values())
    # a table's weight used by a module outside the table (tied weights) cannot follow a compressed table
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for site in found:
        for t in site.tables:
            outside = [n for n in owners.get(id(t.weight), []) if not any(_under(n, p) for p in site.paths)]
            if outside:
                site.problems.append(
                    f"its weight is also used as {outside} (tied weights); a compressed table cannot stay tied"
                )
    # give every table a distinct local name inside its module, and a distinct key
    for site in found:
        seen: set[str] = set()
        for t in site.tables:
            base, i = t.local, 1
            while t.local in seen:
                t.local, i = f"{base}_{i}", i + 1
            seen.add(t.local)
    return found, notes


def find_tables(model: nn.Module) -> list[dict[str, Any]]:
    """The embedding tables :func:`compress` finds in ``model``, and what it could not honour.

    Example:
        >>> model = nn.ModuleDict({"user": nn.Embedding(1000, 8), "tags": nn.EmbeddingBag(50, 8, mode="max")})
        >>> [(t["key"], t["kind"], t["num_embeddings"], t["problems"] != []) for t in find_tables(model)]
        [('user', 'Embedding', 1000, False), ('tags', 'EmbeddingBag', 50, True)]
    """
    sites, _ = _find_sites(model)
    return [
        {"key": t.key, "kind": s.kind, "paths": list(s.paths), "feature_names": list(t.feature_names),
         "num_embeddings": t.num_embeddings, "embedding_dim": t.embedding_dim, "problems": list(s.problems)}
        for s in sites for t in s.tables
    ]


# ----------------------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------------------
def _restrict(config: MethodConfig, all_keys: Sequence[str], names: Mapping[str, str]) -> MethodConfig:
    """The part of a config sized over all tables that concerns some of them, keyed by their local names."""
    changes = {}
    every = set(all_keys)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Mapping) and value and set(value) == every:
            changes[f.name] = {local: value[key] for key, local in names.items()}
    return dataclasses.replace(config, **changes) if changes else config


def _local_specs(site: _Site, counts: Mapping[str, np.ndarray]) -> list[FeatureSpec]:
    return [FeatureSpec(t.local, t.num_embeddings, t.embedding_dim, counts.get(t.key)) for t in site.tables]


def _plan_global(sites, method, budget_bytes, counts):
    """One plan over every table; None when the sized config cannot be split into per-module configs."""
    tables = [t for s in sites for t in s.tables]
    specs = [FeatureSpec(t.key, t.num_embeddings, t.embedding_dim, counts.get(t.key)) for t in tables]
    whole = plan(specs, method, budget_bytes)
    if whole.shared_bytes:
        return None
    by_key = {fp.name: fp for fp in whole.features}
    out = {}
    for s in sites:
        try:
            config = _restrict(whole.config, [t.key for t in tables], {t.key: t.local for t in s.tables})
            plans, shared = method_class(config).describe(_local_specs(s, counts), config)
        except (ValueError, TypeError, KeyError):
            return None
        if shared or [p.bytes for p in plans] != [by_key[t.key].bytes for t in s.tables]:
            return None
        out[id(s)] = (config, plans, {})
    return out


def _plan_per_module(sites, method, budget_bytes, counts):
    """A byte cap per module: small modules stay full, the others share what is left equally."""
    full = {id(s): sum(t.num_embeddings * t.embedding_dim * FP32 for t in s.tables) for s in sites}
    cap = largest_feasible(lambda c: sum(min(full[id(s)], c) for s in sites), budget_bytes, 1, max(full.values()))
    if cap is None:
        raise BudgetError(f"{method.method}: a budget of {budget_bytes:,} bytes cannot hold {len(sites)} modules")
    out = {}
    for s in sites:
        specs = _local_specs(s, counts)
        config = FullConfig() if full[id(s)] <= cap else method
        p = plan(specs, config, None if isinstance(config, FullConfig) else cap)
        out[id(s)] = (p.config, list(p.features), dict(p.shared_bytes))
    return out


# ----------------------------------------------------------------------------------------------------
# building and initialising
# ----------------------------------------------------------------------------------------------------
def _build_site(site: _Site, config: MethodConfig, seed: int | None,
                counts: Mapping[str, np.ndarray]) -> tuple[nn.Module, EmbeddingModule]:
    device = site.device
    module = site.module
    t0 = site.tables[0]
    if site.kind == "Embedding":
        new = Embedding(t0.num_embeddings, t0.embedding_dim, method=config, counts=counts.get(t0.key),
                        name=t0.local, device=device, seed=seed, padding_idx=module.padding_idx)
        inner = new.collection
    elif site.kind == "EmbeddingBag":
        new = EmbeddingBag(t0.num_embeddings, t0.embedding_dim, method=config, mode=module.mode,
                           include_last_offset=module.include_last_offset, counts=counts.get(t0.key),
                           name=t0.local, device=device, seed=seed, padding_idx=module.padding_idx)
        inner = new.collection
    elif site.kind == "EmbeddingBagCollection":
        pooling = Pooling.SUM if module.embedding_bag_configs()[0].pooling == PoolingType.SUM else Pooling.MEAN
        inner = build(_local_specs(site, counts), config, pooling=pooling, is_weighted=module.is_weighted(),
                      device=device, seed=seed)
        new = inner
        if site.grouped:
            tables = [TableFeatures(t.local, t.feature_names, t.embedding_names) for t in site.tables]
            new = GroupedEmbeddingBagCollection(inner, tables, module.embedding_bag_configs())
    else:
        inner = build(_local_specs(site, counts), config, device=device, seed=seed)
        tables = [TableFeatures(t.local, t.feature_names, t.embedding_names) for t in site.tables]
        new = GroupedEmbeddingCollection(inner, tables, module.embedding_configs(), module.need_indices())
    if getattr(module, "sparse", False):
        sparse_parameters(new)  # honour sparse=True: the new tables get sparse gradients too
    return new, inner


def _initialise(inner: EmbeddingModule, name: str, weight: torch.Tensor) -> str:
    """Initialise feature ``name`` of ``inner`` from a trained table with the method's ``init_from_weights``
    hook; a method without one starts at random (the report says so)."""
    if weight.device.type == "meta":
        return "random (the trained table is on the meta device)"
    try:
        with torch.no_grad():
            return str(inner.init_from_weights(name, weight.detach()))
    except NotImplementedError:
        return f"random ({type(inner).__name__} has no initialisation from a trained table)"


def _run(model: nn.Module, example_inputs: tuple, hooked: Sequence[nn.Module] = ()) -> tuple[Any, list[int]]:
    """Run ``model`` on the example inputs in eval mode without gradients (its modes are restored), counting
    the forward calls of each module in ``hooked``."""
    calls = [0] * len(hooked)
    handles = [m.register_forward_pre_hook(lambda mod, args, _i=i: calls.__setitem__(_i, calls[_i] + 1))
               for i, m in enumerate(hooked)]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return out, calls


def _shapes(out: Any) -> Any:
    """The nested structure of an output with every tensor replaced by its shape."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if hasattr(out, "values") and hasattr(out, "keys") and callable(out.values) and not isinstance(out, Mapping):
        return ("keyed", list(out.keys()), tuple(out.values().shape))  # KeyedTensor / KeyedJaggedTensor
    if isinstance(out, Mapping):
        return {k: _shapes(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return [_shapes(v) for v in out]
    return type(out).__name__


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


# ----------------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------------
def compress(
    model: nn.Module,
    budget: Budget | int | float | str | None,
    method: MethodConfig | str,
    *,
    dry_run: bool = False,
    exclude: Iterable[str] = (),
    init_from_weights: bool = True,
    on_unsupported: str = "error",
    counts: Mapping[str, np.ndarray] | None = None,
    inplace: bool = False,
    seed: int | None = None,
    example_inputs: Any = None,
) -> tuple[nn.Module, CompressionReport]:
    """Replace the embedding tables of ``model`` by compressed ones that together fit ``budget``.

    Args:
        model: any ``nn.Module`` holding ``nn.Embedding`` / ``nn.EmbeddingBag`` / TorchRec
            ``EmbeddingBagCollection`` / ``EmbeddingCollection`` modules.
        budget: bytes for ALL the tables found (excluded and skipped ones count at their full size), or a
            fraction of their full size (``0.1``, ``"1/10"``), or ``"64MiB"``; see :func:`embtable.as_budget`.
        method: a method config (``embtable.HashConfig()``) or a method name (``"hash"``); size fields left
            unset are planned from the budget.
        dry_run: only plan and report; the model is returned unchanged.
        exclude: tables to leave as they are: module paths or report keys (``"path/table"``).
        init_from_weights: initialise the compressed rows from the trained ones where the method allows it
            with the method's ``init_from_weights(name, weight)`` hook (e.g. a copy, averages of the rows
            sharing a stored row, a truncated SVD); a method without one starts at random, and the report
            says so per table).
        on_unsupported: ``"error"`` (default) raises for a table whose settings cannot be honoured;
            ``"skip"`` leaves it full and lists it with its reason in the report.
        counts: optional id frequency counts per table key, for methods that use popularity.
        inplace: swap the modules in ``model`` itself; by default a copy is returned and ``model`` is
            untouched (the replaced tables are not copied).
        seed: seeds the new modules' initialisation (the global RNG is left untouched).
        example_inputs: optional positional arguments of ``model`` (a tuple, or one input). Then the model
            is run on them (eval mode, no gradients) to check that every table is called through its
            ``forward`` (a table whose weight the model reads directly, e.g. ``F.embedding(ids, t.weight)``,
            cannot be served by a compressed table: refused like the other unsupported settings), and
            the new model is run on them to check its outputs have the same shapes.

    Returns:
        ``(new model, CompressionReport)``.

    Example:
        >>> import embtable, torch
        >>> class TwoTower(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.user = nn.Embedding(100_000, 16)
        ...         self.item = nn.Embedding(20_000, 16)
        ...         self.country = nn.Embedding(200, 16)
        ...     def forward(self, u, i, c):
        ...         return (self.user(u) * (self.item(i) + self.country(c))).sum(-1)
        >>> model, report = compress(TwoTower(), "1/20", embtable.HashConfig(), seed=0)
        >>> [(t.key, t.status, t.rows) for t in report.tables]
        [('user', 'compressed', 2903), ('item', 'compressed', 2903), ('country', 'full', 200)]
        >>> report.bytes_after <= report.budget_bytes
        True
        >>> model(torch.tensor([99_999]), torch.tensor([5]), torch.tensor([3])).shape
        torch.Size([1])
    """
    if on_unsupported not in ("error", "skip"):
        raise ValueError(f"on_unsupported must be 'error' or 'skip', got {on_unsupported!r}")
    if isinstance(method, str):
        method = config_class(method)()
    if not isinstance(method, MethodConfig):
        raise TypeError(f"method must be a method config such as embtable.HashConfig() or a name, got {method!r}")
    sites, notes = _find_sites(model)
    if not sites:
        raise ValueError(
            f"{type(model).__name__} holds no nn.Embedding, nn.EmbeddingBag, EmbeddingBagCollection or "
            "EmbeddingCollection outside embtable modules: nothing to compress"
        )
    reference = None
    if example_inputs is not None:
        example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        reference, calls = _run(model, example_inputs, [s.module for s in sites])
        for s, n in zip(sites, calls):
            if n == 0:
                s.problems.append(
                    "the model did not call it through its forward on example_inputs: it may read the table's "
                    "weight directly (e.g. F.embedding(ids, table.weight)), which a compressed table cannot serve, "
                    "or the table is unused"
                )
    all_tables = {t.key: (s, t) for s in sites for t in s.tables}
    counts = dict(counts or {})
    unknown = sorted(set(counts) - set(all_tables))
    if unknown:
        raise ValueError(f"counts given for unknown table(s) {unknown}; the tables are {sorted(all_tables)}")

    excluded_keys: set[str] = set()
    for name in exclude:
        matched = [t.key for s in sites for t in s.tables if name == t.key or name in s.paths]
        if not matched:
            raise ValueError(f"exclude: no table named {name!r}; the tables are {sorted(all_tables)}")
        excluded_keys.update(matched)
    status: dict[int, str] = {}
    for s in sites:
        if all(t.key in excluded_keys for t in s.tables):
            status[id(s)] = "excluded"
        elif any(t.key in excluded_keys for t in s.tables):
            raise ValueError(
                f"exclude: {s.kind} at {s.path!r} is one module; exclude all its tables or none "
                f"({[t.key for t in s.tables]})"
            )
        elif s.problems:
            if on_unsupported == "error":
                raise ValueError(
                    f"cannot compress {s.kind} at {s.path!r}: " + "; ".join(s.problems)
                    + f". Leave it out with exclude=[{s.path!r}], or pass on_unsupported='skip' to keep it full"
                )
            status[id(s)] = "skipped"
        else:
            status[id(s)] = "compress"

    specs_all = [FeatureSpec(t.key, t.num_embeddings, t.embedding_dim) for t in (v[1] for v in all_tables.values())]
    budget_obj = as_budget(budget)
    budget_bytes = budget_obj.resolve(specs_all) if budget_obj is not None else None
    kept_bytes = sum(t.full_bytes for s in sites if status[id(s)] != "compress" for t in s.tables)
    todo = [s for s in sites if status[id(s)] == "compress"]
    left = None if budget_bytes is None else budget_bytes - kept_bytes
    if left is not None and left <= 0 and todo:
        raise BudgetError(
            f"the budget of {budget_bytes:,} bytes is used up by the {kept_bytes:,} bytes of the tables left "
            "full (excluded or skipped); raise the budget or exclude fewer tables"
        )
    planning, plans = "global", {}
    if todo:
        try:
            plans = _plan_global(todo, method, left, counts)
        except BudgetError:
            raise
        except ValueError as err:  # e.g. a shared table that needs the same dim for every table
            if left is None or len(todo) == 1:
                raise
            plans, global_error = None, err
        else:
            global_error = None
        if plans is None:
            if left is None:
                raise ValueError(
                    f"{method.method}: its sized config shares tensors across tables, so each module needs its "
                    "own budget; give compress() a budget"
                )
            planning = "per module"
            plans = _plan_per_module(todo, method, left, counts)
            if global_error is not None:
                notes.append(f"one plan across all tables failed ({global_error}); planned per module instead")

    target = model
    if not dry_run and not inplace:  # copy everything but the tables about to be replaced
        target = copy.deepcopy(model, memo={id(s.module): s.module for s in todo})
    reports: list[TableReport] = []
    shared: dict[str, int] = {}
    for s in sites:
        st = status[id(s)]
        if st != "compress":
            reason = "excluded" if st == "excluded" else "; ".join(s.problems)
            for t in s.tables:
                reports.append(TableReport(t.key, s.kind, tuple(s.paths), t.feature_names, t.num_embeddings,
                                           t.embedding_dim, "", st, t.num_embeddings, t.embedding_dim,
                                           t.full_bytes, t.full_bytes, reason, "unchanged"))
            continue
        config, feature_plans, shared_bytes = plans[id(s)]
        inits = {t.key: "" for t in s.tables}
        if not dry_run:
            new, inner = _build_site(s, config, seed, counts)
            for t in s.tables:
                inits[t.key] = _initialise(inner, t.local, t.weight) if init_from_weights else "random"
                if getattr(s.module, "padding_idx", None) is not None:
                    inits[t.key] += f"; padding_idx={s.module.padding_idx} reads an exact zero row, never trained"
            planned = sum(p.bytes for p in feature_plans) + sum(shared_bytes.values())
            measured = memory_report(new).inference_bytes
            if measured != planned:
                raise RuntimeError(
                    f"{config.method}: the module built for {s.path!r} holds {measured:,} bytes but its plan says "
                    f"{planned:,}; the method's describe() is wrong (please report this)"
                )
            if s.path == "":
                target = new
            else:
                for path in s.paths:
                    _set_submodule(target, path, new)
        for name, nbytes in shared_bytes.items():
            shared[f"{s.path}/{name}"] = nbytes
        for t, p in zip(s.tables, feature_plans):
            reports.append(TableReport(
                t.key, s.kind, tuple(s.paths), t.feature_names, t.num_embeddings, t.embedding_dim,
                config.method, "compressed" if p.compressed else "full", p.rows, p.dim, t.full_bytes,
                p.bytes, p.detail, inits[t.key],
            ))
    if reference is not None and not dry_run:
        got, _ = _run(target, example_inputs)
        if _shapes(got) != _shapes(reference):
            raise RuntimeError(
                f"after compression the model's outputs on example_inputs have shapes {_shapes(got)}, before "
                f"{_shapes(reference)}; please report this with the model"
            )
        notes.append("checked on example_inputs: every compressed table is called through its forward, and the "
                     "outputs keep their shapes")
    report = CompressionReport(method.method, method.to_dict(), budget_bytes, planning, tuple(reports), shared,
                               dry_run, tuple(notes))
    if budget_bytes is not None and report.bytes_after > budget_bytes:
        raise BudgetError(f"planned {report.bytes_after:,} bytes over the budget of {budget_bytes:,}")
    return (model if dry_run else target), report

