"""Export a trained compressed model for serving, and load it in a fresh process.

:func:`export` turns a trained model (its tables compressed by :func:`embtable.compress` or built with
:func:`embtable.build`) into its inference form and writes ONE file:

- the inference form: eval mode, no gradients; each embtable module replaced by its
  ``inference_module()`` (a method's serving form; a training stage without one is refused with the step
  to take);
- optional row-wise quantisation of the stored rows of every embtable table, on top of any method (the
  method's id mapping and combining are untouched: only the storage leaves change):

  ======  ===========================================================  ===========================
  dtype   stored per row of dim ``D`` (FBGEMM's fused row-wise layout)  error per element
  ======  ===========================================================  ===========================
  fp32    ``4 D`` bytes                                                 none (predictions exact)
  fp16    ``2 D`` bytes                                                 relative ``2**-11``
  int8    ``D`` bytes + fp32 scale and bias = ``D + 8``                 ``<= (max - min) / 510``
  int4    ``ceil(D / 4) * 2`` bytes + fp16 scale and bias               ``<= (max - min) / 30`` + fp16
  ======  ===========================================================  ===========================

  (``max``/``min`` of the row). A table whose fp16 rows are no larger than its int8/int4 rows (dims up
  to 8 for int8, up to 3 for int4: the per-row scale and bias dominate) is stored as fp16. Rows are quantised and dequantised with FBGEMM's CPU operators
  (``FloatToFused8BitRowwiseQuantized``, ``FloatToFusedNBitRowwiseQuantizedSBHalf`` and inverses);
  a lookup dequantises only the rows it touches, then pools exactly like ``nn.EmbeddingBag``.
- the file: a ``torch.save`` of plain data and tensors (readable with ``torch.load(weights_only=True)``):
  ``format``/``format_version``, versions, the dtype, per table module its method config, features and
  bytes, every tensor of the model by its qualified name (a state dict), and the model's structure
  pickled WITHOUT its tensors. :func:`load` rebuilds the structure and puts the tensors back: the fresh
  process needs the model's classes importable (as for ``torch.load`` of a module), nothing of the training
  run. Only load files you trust: the structure is unpickled.

The bytes reported are those of the tensors written (each storage once).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import pickle
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .atomic import atomic_write
from .compress import EMBTABLE_MODULES
from .module import EmbeddingModule, is_tracing

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "ExportReport",
    "QuantizedEmbedding",
    "QuantizedEmbeddingBag",
    "FlatInputs",
    "export",
    "export_program",
    "inference_model",
    "load",
    "quantize_rows",
    "dequantize_rows",
    "row_bytes",
    "storage_dtype",
]

FORMAT = "embtable.export"
FORMAT_VERSION = 1
DTYPES = ("fp32", "fp16", "int8", "int4")


def _fbgemm():
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm; torchrec imports it too)

    return torch.ops.fbgemm


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


def _padded_dim(dim: int) -> int:
    return -(-dim // 4) * 4  # FBGEMM's 4-bit rows need whole fp16 words: D rounded up to a multiple of 4


def row_bytes(dtype: str, dim: int) -> int:
    """Bytes of one stored row of ``dim`` values.

    >>> [row_bytes(d, 16) for d in DTYPES]
    [64, 32, 24, 12]
    """
    return {"fp32": 4 * dim, "fp16": 2 * dim, "int8": dim + 8, "int4": _padded_dim(dim) // 2 + 4}[_check_dtype(dtype)]


def quantize_rows(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """Store the rows of ``weight [n, D]`` as ``dtype`` (FBGEMM's fused row-wise layout for int8/int4).

    Returns ``[n, row_bytes]`` uint8 (int8, int4), ``[n, D]`` float16 (fp16) or float32 (fp32).
    """
    weight = weight.detach().to(torch.float32).contiguous()
    if _check_dtype(dtype) == "fp32":
        return weight.clone()
    if dtype == "fp16":
        return weight.to(torch.float16)
    if weight.device.type == "meta":
        return torch.empty(weight.shape[0], row_bytes(dtype, weight.shape[1]), dtype=torch.uint8, device="meta")
    ops = _fbgemm()
    if dtype == "int8":
        return ops.FloatToFused8BitRowwiseQuantized(weight)
    pad = _padded_dim(weight.shape[1]) - weight.shape[1]
    if pad:  # pad with a copy of the row's first value: the row's min and max (its scale) do not change
        weight = torch.cat([weight, weight[:, :1].expand(-1, pad)], dim=1)
    return ops.FloatToFusedNBitRowwiseQuantizedSBHalf(weight, 4)


def dequantize_rows(rows: torch.Tensor, dtype: str, dim: int) -> torch.Tensor:
    """The float32 ``[n, dim]`` values of stored rows (inverse of :func:`quantize_rows`).

    >>> w = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    >>> [round(float((dequantize_rows(quantize_rows(w, d), d, 6) - w).abs().max()), 2) for d in DTYPES]
    [0.0, 0.0, 0.01, 0.05]
    """
    if dtype in ("fp32", "fp16"):
        return rows.to(torch.float32)
    if not is_tracing() and rows.shape[0] == 0:
        return torch.zeros(0, dim, device=rows.device)
    ops = _fbgemm()
    if dtype == "int8":
        return ops.Fused8BitRowwiseQuantizedToFloat(rows)
    return ops.FusedNBitRowwiseQuantizedSBHalfToFloat(rows, 4)[:, :dim]


class _QuantizedRows(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, _check_dtype(dtype)
        storage = {"fp32": torch.float32, "fp16": torch.float16}.get(dtype, torch.uint8)
        width = embedding_dim if dtype in ("fp32", "fp16") else row_bytes(dtype, embedding_dim)
        self.register_buffer("rows", torch.empty(num_embeddings, width, dtype=storage, device=device))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 ``[N, D]`` values of the rows of ``ids [N]`` (only these rows are dequantised)."""
        return dequantize_rows(self.rows[ids], self.dtype, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table dequantised (for code that reads ``.weight``; a lookup never needs it)."""
        return dequantize_rows(self.rows, self.dtype, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"


class QuantizedEmbeddingBag(_QuantizedRows):
    """``nn.EmbeddingBag`` with row-wise quantised rows: ``forward(input, offsets=None, per_sample_weights=None)``.

    Example:
        >>> bag = nn.EmbeddingBag(100, 8, mode="sum")
        >>> q = QuantizedEmbeddingBag.from_float(bag, "int8")
        >>> ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 1])
        >>> bool((q(ids, offsets) - bag(ids, offsets)).abs().max() < 0.05), q.rows.shape
        (True, torch.Size([100, 16]))
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str, mode: str = "sum",
                 include_last_offset: bool = False, device=None) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype, device)
        if mode not in ("sum", "mean"):
            raise ValueError(f"QuantizedEmbeddingBag pools with 'sum' or 'mean', got mode={mode!r}")
        self.mode, self.include_last_offset = mode, include_last_offset

    @classmethod
    def from_float(cls, bag: nn.EmbeddingBag, dtype: str) -> QuantizedEmbeddingBag:
        out = cls(bag.num_embeddings, bag.embedding_dim, dtype, bag.mode, bag.include_last_offset,
                  device=bag.weight.device)
        out.rows = quantize_rows(bag.weight, dtype)
        return out

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        flat = input.reshape(-1)
        values = self.lookup(flat)  # [N, D]
        positions = torch.arange(flat.numel(), device=flat.device)
        if input.dim() == 2:
            positions = positions.view(input.shape)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(input.shape)
        return F.embedding_bag(positions, values, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset)


class QuantizedEmbedding(_QuantizedRows):
    """``nn.Embedding`` with row-wise quantised rows: ids of any shape -> ``[*ids.shape, D]``.

    >>> q = QuantizedEmbedding.from_float(nn.Embedding(10, 4), "fp16")
    >>> q(torch.tensor([[1, 2], [3, 4]])).shape
    torch.Size([2, 2, 4])
    """

    @classmethod
    def from_float(cls, emb: nn.Embedding, dtype: str) -> QuantizedEmbedding:
        out = cls(emb.num_embeddings, emb.embedding_dim, dtype, device=emb.weight.device)
        out.rows = quantize_rows(emb.weight, dtype)
        return out

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.lookup(input.reshape(-1)).reshape(*input.shape, self.embedding_dim)


# ----------------------------------------------------------------------------------------------------
# the inference form
# ----------------------------------------------------------------------------------------------------
def _table_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The outermost embtable modules of ``model`` (each once), with a path."""
    seen: set[int] = set()
    covered: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(c + ".") for c in covered) or (covered and "" in covered):
            continue
        if isinstance(module, EMBTABLE_MODULES) and id(module) not in seen:
            seen.add(id(module))
            covered.append(path)
            yield path, module


def _serving_form(path: str, module: nn.Module) -> nn.Module:
    """``module`` with every embtable module in it (the outermost ones) replaced by its ``inference_module()``."""
    if isinstance(module, EmbeddingModule):
        found = [("", module)]
    else:
        found, covered = [], []
        for sub_path, sub in module.named_modules():
            if isinstance(sub, EmbeddingModule) and not any(sub_path.startswith(c + ".") for c in covered):
                found.append((sub_path, sub))
                covered.append(sub_path)
    for sub_path, sub in found:
        try:
            served = sub.inference_module()
        except ValueError as err:
            where = ".".join(p for p in (path, sub_path) if p) or "<model>"
            raise ValueError(f"cannot export {where}: {err}") from err
        if served is not sub:
            if sub_path == "":
                module = served
            else:
                _replace(module, sub_path, served)
    return module


def inference_model(model: nn.Module, dtype: str = "fp32") -> nn.Module:
    """A copy of ``model`` in inference form: eval mode, no gradients, embtable rows stored as ``dtype``.

    Only the storage leaves (``nn.Embedding`` / ``nn.EmbeddingBag``) inside embtable modules are
    quantised; tables the model keeps outside embtable (excluded from compression) stay as they are.
    Every embtable module is first replaced by its ``inference_module()`` (its serving form; a training
    stage that has none raises ``ValueError`` with the step to take).
    """
    _check_dtype(dtype)
    out = copy.deepcopy(model).eval().requires_grad_(False)
    for path, module in list(_table_modules(out)):
        served = _serving_form(path, module)
        if served is not module:
            module = served
            _replace(out, path, module)
            out = module if path == "" else out
        if dtype == "fp32":
            continue
        for leaf_path, leaf in list(module.named_modules()):
            if isinstance(leaf, nn.EmbeddingBag | nn.Embedding):
                kind = QuantizedEmbeddingBag if isinstance(leaf, nn.EmbeddingBag) else QuantizedEmbedding
                _replace(module, leaf_path, kind.from_float(leaf, storage_dtype(dtype, leaf.embedding_dim)))
    return out


def storage_dtype(dtype: str, dim: int) -> str:
    """The dtype a table of ``dim`` is stored in when ``dtype`` is asked for.

    The per-row scale and bias of int8/int4 cost 8/4 bytes: where fp16 rows are no larger (small dims),
    fp16 is used instead, as it is also the more precise.

    >>> [storage_dtype("int8", d) for d in (1, 8, 16)], [storage_dtype("int4", d) for d in (1, 4, 16)]
    (['fp16', 'fp16', 'int8'], ['fp16', 'int4', 'int4'])
    """
    if dtype in ("int8", "int4") and row_bytes("fp16", dim) <= row_bytes(dtype, dim):
        return "fp16"
    return dtype


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    if path == "":
        return
    parent_path, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, attr, new)


# ----------------------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What :func:`export` wrote.

    Attributes:
        table_bytes_fp32: bytes of the embtable table modules of the trained model (fp32).
        table_bytes: bytes of the same modules as exported (quantised rows + their other tensors).
        other_bytes: every other tensor of the model (dense layers, tables left uncompressed).
        file_bytes: size of the file on disk (tensors plus metadata and the pickled structure).
        modules: per table module path: ``{"method", "bytes_fp32", "bytes"}``.
    """

    path: str
    dtype: str
    table_bytes_fp32: int
    table_bytes: int
    other_bytes: int
    file_bytes: int
    modules: dict[str, dict[str, Any]]

    @property
    def total_bytes(self) -> int:
        return self.table_bytes + self.other_bytes

    def table(self) -> str:
        lines = [f"{'module':<40}{'method':<10}{'fp32 bytes':>14}{self.dtype + ' bytes':>14}"]
        for path, m in self.modules.items():
            lines.append(f"{path or '<model>':<40}{m['method']:<10}{m['bytes_fp32']:>14,}{m['bytes']:>14,}")
        lines.append(f"tables {self.table_bytes_fp32:,} B -> {self.table_bytes:,} B ({self.dtype}); other tensors "
                     f"{self.other_bytes:,} B; file {self.file_bytes:,} B at {self.path}")
        return "\n".join(lines)


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[int, tuple[str, bool]]]:
    """Every parameter and buffer by its first qualified name, and id -> (name, is parameter)."""
    named: dict[str, torch.Tensor] = {}
    ids: dict[int, tuple[str, bool]] = {}
    for is_param, items in ((True, model.named_parameters(remove_duplicate=False)),
                            (False, model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            if t is None or id(t) in ids:
                continue
            ids[id(t)] = (name, is_param)
            named[name] = t.detach()
    return named, ids


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _module_bytes(module: nn.Module) -> int:
    return _unique_bytes(list(module.parameters()) + list(module.buffers()))


def _describe(path: str, module: nn.Module) -> dict[str, Any]:
    inner = module
    for attr in ("collection", "inner"):  # embtable.Embedding / EmbeddingBag, the grouped modules
        if not isinstance(inner, EmbeddingModule):
            inner = getattr(module, attr, None)
    info: dict[str, Any] = {"path": path, "class": type(module).__name__}
    if isinstance(inner, EmbeddingModule):
        info.update(
            method=inner.config.method,
            config=inner.config.to_dict(),
            features=[{"name": f.name, "num_embeddings": f.num_embeddings, "embedding_dim": f.embedding_dim}
                      for f in inner.logical_features],
            pooling=inner.pooling.value,
            is_weighted=inner.is_weighted(),
            out_of_range=inner.out_of_range.value,
        )
    return info


def _rebuild_spec(model: nn.Module, path: str, module: nn.Module) -> dict[str, Any]:
    """What :func:`load` with ``model=`` needs to rebuild this module in a freshly built model."""
    from .grouped import GroupedEmbeddingBagCollection, GroupedEmbeddingCollection
    from .single import Embedding, EmbeddingBag

    paths = [p for p, m in model.named_modules(remove_duplicate=False) if m is module]
    args: dict[str, Any] = {}
    if isinstance(module, Embedding | EmbeddingBag):
        args = {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim, "name": module.name}
        if isinstance(module, EmbeddingBag):
            args.update(mode=module.mode, include_last_offset=module.include_last_offset)
    elif isinstance(module, GroupedEmbeddingBagCollection | GroupedEmbeddingCollection):
        args = {"tables": [[t.table, list(t.feature_names), list(t.embedding_names)] for t in module.tables]}
        if isinstance(module, GroupedEmbeddingCollection):
            args["need_indices"] = module.need_indices()
    leaves = []
    for leaf_path, leaf in module.named_modules():
        if isinstance(leaf, _QuantizedRows):
            leaves.append({"path": leaf_path, "bag": isinstance(leaf, QuantizedEmbeddingBag), "dtype": leaf.dtype,
                           "num_embeddings": leaf.num_embeddings, "embedding_dim": leaf.embedding_dim,
                           "mode": getattr(leaf, "mode", "sum"),
                           "include_last_offset": getattr(leaf, "include_last_offset", False)})
    return {"paths": paths, "args": args, "quantized": leaves}


def _rebuild(spec: dict[str, Any], original: nn.Module, device: torch.device) -> nn.Module:
    from .build import build
    from .config import method_config_from_dict
    from .features import FeatureSpec
    from .grouped import GroupedEmbeddingBagCollection, GroupedEmbeddingCollection, TableFeatures
    from .single import Embedding, EmbeddingBag

    if "config" not in spec:
        raise ValueError(f"{spec['path']!r}: a {spec['class']} has no method config in the file; use load(path)")
    config = method_config_from_dict(spec["config"], source=f"exported module {spec['path']!r}")
    features = [FeatureSpec(**f) for f in spec["features"]]
    kwargs = {"out_of_range": spec["out_of_range"], "device": device}
    args, cls = spec["args"], spec["class"]
    if cls == "Embedding":
        module = Embedding(method=config, **args, **kwargs)
    elif cls == "EmbeddingBag":
        module = EmbeddingBag(method=config, **args, **kwargs)
    else:
        inner = build(features, config, pooling=spec["pooling"], is_weighted=spec["is_weighted"], **kwargs)
        tables = [TableFeatures(t, tuple(f), tuple(e)) for t, f, e in args.get("tables", [])]
        if cls == "GroupedEmbeddingBagCollection":
            module = GroupedEmbeddingBagCollection(inner, tables, original.embedding_bag_configs())
        elif cls == "GroupedEmbeddingCollection":
            module = GroupedEmbeddingCollection(inner, tables, original.embedding_configs(), args["need_indices"])
        else:
            module = inner
    # the file holds the serving form (pep's CSR rows, dpq's codes without a query table): build it the same
    # way export did, then the state dict fills it
    module = _serving_form(spec["path"], module)
    for leaf in spec["quantized"]:
        new = (QuantizedEmbeddingBag(leaf["num_embeddings"], leaf["embedding_dim"], leaf["dtype"], leaf["mode"],
                                     leaf["include_last_offset"], device=device) if leaf["bag"]
               else QuantizedEmbedding(leaf["num_embeddings"], leaf["embedding_dim"], leaf["dtype"], device=device))
        _replace(module, leaf["path"], new)
    return module


def _load_into(model: nn.Module, payload: dict[str, Any], path: str, device: torch.device) -> nn.Module:
    """Rebuild the exported table modules inside a freshly built ``model`` and fill every tensor."""
    model = _serving_form(path, model)  # the file holds the serving forms (e.g. codes without a query table)
    for spec in payload["modules"]:
        try:
            original = model.get_submodule(spec["paths"][0]) if spec["paths"][0] else model
        except AttributeError as err:
            raise ValueError(f"{path}: the model has no module {spec['paths'][0]!r} to replace ({err}); pass the "
                             f"model the file was exported from ({payload.get('model_class')})") from err
        new = _rebuild(spec, original, device)
        if spec["paths"] == [""]:
            model = new
        for p in spec["paths"]:
            _replace(model, p, new)
    if any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device=device)  # a model built on the meta device: every tensor comes from the file
    saved: dict[str, torch.Tensor] = payload["state_dict"]
    filled: set[int] = set()
    unused = set(saved)
    with torch.no_grad():
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
                model.named_buffers(remove_duplicate=False)):
            if name in saved:
                if tuple(saved[name].shape) != tuple(t.shape) or saved[name].dtype != t.dtype:
                    raise ValueError(f"{path}: {name} is {saved[name].dtype} {tuple(saved[name].shape)} in the file "
                                     f"but {t.dtype} {tuple(t.shape)} in the model; is it the same architecture?")
                t.copy_(saved[name])
                filled.add(id(t))
                unused.discard(name)
        missing = [n for n, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)) if id(t) not in filled]
    if missing or unused:
        raise ValueError(f"{path}: the model does not match the file: missing {sorted(missing)[:5]}, "
                         f"not in the model {sorted(unused)[:5]}")
    return model.eval().requires_grad_(False)


class _StructurePickler(pickle.Pickler):
    """Pickles a module with every tensor replaced by a reference (its tensors are written separately)."""

    def __init__(self, file, ids: dict[int, tuple[str, bool]]) -> None:
        super().__init__(file, protocol=4)
        self.ids, self.extras = ids, []

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            if id(obj) in self.ids:
                name, is_param = self.ids[id(obj)]
                return ("tensor", name, is_param, bool(obj.requires_grad))
            self.extras.append(obj.detach())  # a tensor held outside parameters and buffers (a cache)
            return ("extra", len(self.extras) - 1, isinstance(obj, nn.Parameter), bool(obj.requires_grad))
        return None


class _StructureUnpickler(pickle.Unpickler):
    def __init__(self, file, tensors: dict[str, torch.Tensor], extras: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors, self.extras, self.made = tensors, extras, {}

    def persistent_load(self, pid):
        kind, key, is_param, requires_grad = pid
        if (kind, key) not in self.made:
            t = self.tensors[key] if kind == "tensor" else self.extras[key]
            self.made[(kind, key)] = nn.Parameter(t, requires_grad=requires_grad) if is_param else t
        return self.made[(kind, key)]


def export(model: nn.Module, path: str | os.PathLike, dtype: str = "fp32", *, format: str = "embtable",
           example_inputs: tuple | None = None) -> ExportReport:
    """Write the inference form of a trained model to ``path`` (one file); see the module docstring.

    Args:
        model: a trained model holding embtable modules (e.g. from :func:`embtable.compress`).
        path: the file to write (atomically and durably: :func:`embtable.atomic.atomic_write`).
        dtype: ``"fp32"`` (predictions equal the trained model's), ``"fp16"``, ``"int8"`` or ``"int4"``
            row-wise quantisation of the stored rows.
        format: ``"embtable"`` (this file, read by :func:`load`) or ``"pt2"``: a ``torch.export`` program of
            the whole model that a server loads with ``torch.export.load`` WITHOUT embtable (see
            :func:`export_program`); it needs ``example_inputs``.
        example_inputs: for ``"pt2"``, a tuple of the model's arguments (tensors and KeyedJaggedTensors, a
            batch of at least 2); batch size and bag lengths stay dynamic in the program.

    Returns:
        an :class:`ExportReport` with the bytes of exactly what was written.

    Example:
        >>> import embtable, tempfile, os
        >>> model = nn.Sequential(embtable.EmbeddingBag(10_000, 16, method=embtable.HashConfig(), budget="1/4"))
        >>> folder = tempfile.TemporaryDirectory()
        >>> path = os.path.join(folder.name, "model.pt")
        >>> report = export(model, path, "int8")
        >>> report.table_bytes_fp32, report.table_bytes
        (159984, 60024)
        >>> served = load(path)
        >>> ids, offsets = torch.tensor([5, 9_999, 42]), torch.tensor([0, 2])
        >>> bool((served[0](ids, offsets) - model[0](ids, offsets)).abs().max() < 0.01)
        True
        >>> folder.cleanup()
    """
    if format == "pt2":
        if example_inputs is None:
            raise ValueError("export(format='pt2') traces the model: pass example_inputs=(dense, kjt) (your model's "
                             "arguments, a batch of at least 2)")
        return export_program(model, path, dtype, example_inputs=example_inputs)
    if format != "embtable":
        raise ValueError(f"export format must be 'embtable' or 'pt2', got {format!r}")
    dtype = _check_dtype(dtype)
    path = os.fspath(path)
    modules_fp32 = {p: (_module_bytes(m), _describe(p, m)) for p, m in _table_modules(model)}
    if not modules_fp32:
        raise ValueError(
            f"{type(model).__name__} holds no embtable module to export; compress it first "
            "(embtable.compress(model, budget, method)) or build its tables with embtable"
        )
    served = inference_model(model, dtype)
    tensors, ids = _tensors(served)
    buffer = io.BytesIO()
    pickler = _StructurePickler(buffer, ids)
    try:
        pickler.dump(served)
    except (pickle.PicklingError, TypeError, AttributeError) as err:
        raise TypeError(
            f"cannot export {type(model).__name__}: its structure cannot be pickled ({err}); export needs the "
            "model's classes to be defined at module level (importable by name), without lambdas or open handles"
        ) from err
    modules: dict[str, dict[str, Any]] = {}
    table_tensors = []
    for p, m in _table_modules(served):
        fp32_bytes, info = modules_fp32[p]
        own = list(m.parameters()) + list(m.buffers())
        table_tensors.extend(own)
        storage: dict[str, int] = {}
        for leaf in m.modules():
            if isinstance(leaf, _QuantizedRows | nn.Embedding | nn.EmbeddingBag):
                kind = leaf.dtype if isinstance(leaf, _QuantizedRows) else "fp32"
                storage[kind] = storage.get(kind, 0) + 1
        modules[p] = {**info, **_rebuild_spec(served, p, m), "storage": storage, "bytes_fp32": fp32_bytes,
                      "bytes": _unique_bytes(own)}
    table_ids = {id(t) for t in table_tensors}
    served_tensors = [t for t in list(served.parameters()) + list(served.buffers()) if id(t) not in table_ids]
    report_fields = dict(
        dtype=dtype,
        table_bytes_fp32=sum(v[0] for v in modules_fp32.values()),
        table_bytes=_unique_bytes(table_tensors),
        other_bytes=_unique_bytes(served_tensors + pickler.extras),
        modules=modules,
    )
    from . import __version__

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "embtable_version": __version__,
        "torch_version": str(torch.__version__),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "dtype": dtype,
        "modules": list(modules.values()),
        "bytes": {k: report_fields[k] for k in ("table_bytes_fp32", "table_bytes", "other_bytes")},
        "state_dict": tensors,
        "extra_tensors": pickler.extras,
        "structure": buffer.getvalue(),
    }
    with atomic_write(path) as f:
        torch.save(payload, f)
    return ExportReport(path=path, file_bytes=os.path.getsize(path), **report_fields)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The plain data of an exported file (format, versions, dtype, modules with their configs, bytes)."""
    payload = _read(path)
    return {k: v for k, v in payload.items() if k not in ("state_dict", "extra_tensors", "structure")}


def _read(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = os.fspath(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: not an embtable export ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an embtable export (no format tag {FORMAT!r})")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: export format version {version!r} is newer than this embtable reads ({FORMAT_VERSION}); "
            "upgrade embtable"
        )
    return payload


def load(path: str | os.PathLike, model: nn.Module | None = None,
         map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by :func:`export`, ready to serve (eval mode, no gradients).

    Args:
        path: the exported file.
        model: optional. ``None``: the model's structure is unpickled from the file; this needs its classes
            importable (e.g. ``torchrec.models.dlrm.DLRM`` or your module's class) and nothing of the
            training run; only load files you trust (as with ``torch.load(weights_only=False)``).
            Or a freshly built, UNcompressed instance of the same architecture (on the ``meta`` device to
            allocate nothing, e.g. ``with torch.device("meta"): model = MyModel()``): the file is then read
            as plain data only (``weights_only``), the table modules are rebuilt from the method configs
            and features in the file, and every tensor comes from its state dict. Use this when the
            classes are not importable by name (defined in ``__main__``) or the file is not trusted.
        map_location: where the tensors go.
    """
    payload = _read(path, map_location)
    if model is not None:
        return _load_into(model, payload, os.fspath(path), torch.device(map_location))
    unpickler = _StructureUnpickler(io.BytesIO(payload["structure"]), payload["state_dict"],
                                    payload["extra_tensors"])
    try:
        model = unpickler.load()
    except (AttributeError, ModuleNotFoundError, ImportError) as err:
        raise ImportError(
            f"{os.fspath(path)}: the model class {payload.get('model_class')!r} (or one it uses) cannot be "
            f"imported in this process ({err}); import the module that defines it first"
        ) from err
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# the pt2 format: a torch.export program of the whole model, loaded without embtable
# ----------------------------------------------------------------------------------------------------
PT2_FORMAT = "embtable.pt2"
PT2_METADATA = "embtable.json"  # the extra file of the program holding the metadata (JSON)


class FlatInputs(nn.Module):
    """``model`` with each ``KeyedJaggedTensor`` argument given as plain tensors: ``values, lengths[, weights]``.

    A server's program then takes only tensors: ``model(dense, kjt)`` becomes ``flat(dense, values,
    lengths)`` with ``values``/``lengths`` exactly the KJT's (``lengths`` key-major, ``[F * B]``; the keys
    are fixed at export). A ``KeyedTensor`` output (a bare table module) is returned as its ``values()``.

    Args:
        model: the model to call.
        signature: per positional argument of ``model``, ``None`` (a tensor, passed through) or
            ``(keys, weighted)`` (a KJT rebuilt from the next two or three tensors).
    """

    def __init__(self, model: nn.Module, signature: list[tuple[list[str], bool] | None]) -> None:
        super().__init__()
        self.model = model
        self.signature = [None if s is None else (list(s[0]), bool(s[1])) for s in signature]

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

        call, i = [], 0
        for spec in self.signature:
            if spec is None:
                call.append(args[i])
                i += 1
                continue
            keys, weighted = spec
            weights = args[i + 2] if weighted else None
            call.append(KeyedJaggedTensor(keys=keys, values=args[i], lengths=args[i + 1], weights=weights))
            i += 3 if weighted else 2
        out = self.model(*call)
        return out.values() if isinstance(out, KeyedTensor) else out

    @staticmethod
    def flatten(example_inputs: tuple) -> tuple[list[tuple[list[str], bool] | None], list[torch.Tensor]]:
        """The signature and flat tensors of ``example_inputs`` (see the class)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        signature, flat = [], []
        for x in example_inputs:
            if isinstance(x, KeyedJaggedTensor):
                weights = x.weights_or_none()
                signature.append((list(x.keys()), weights is not None))
                flat += [x.values(), x.lengths()] + ([weights] if weights is not None else [])
            elif isinstance(x, torch.Tensor):
                signature.append(None)
                flat.append(x)
            else:
                raise TypeError(f"export(format='pt2') takes tensors and KeyedJaggedTensors as inputs, got a "
                                f"{type(x).__name__}")
        return signature, flat


def _dynamic_shapes(signature, flat: list[torch.Tensor], min_batch: int = 1) -> tuple:
    """Batch size and bag lengths dynamic: one ``batch`` Dim (the KJTs' stride and every tensor argument's
    first dim of that size), one Dim per KJT's number of ids; other tensors' first dim ``Dim.AUTO``."""
    from torch.export import Dim

    kjts = [s for s in signature if s is not None]
    batch = None
    if kjts:
        first = _flat_index(signature, [i for i, s in enumerate(signature) if s is not None][0])
        b = flat[first + 1].shape[0] // max(len(kjts[0][0]), 1)
        if b < 2:
            raise ValueError(f"export(format='pt2') needs example inputs with a batch of at least 2 (got {b}): "
                             "torch.export specialises sizes 0 and 1")
        batch = (b, Dim("batch", min=min_batch, max=2**20))
    shapes: list = []
    for k, spec in enumerate(signature):
        i = _flat_index(signature, k)
        if spec is None:
            t = flat[i]
            if t.dim() == 0:
                shapes.append({})
            elif batch is not None and t.shape[0] == batch[0]:
                shapes.append({0: batch[1]})
            else:
                shapes.append({0: Dim.AUTO})
            continue
        keys, weighted = spec
        ids = Dim(f"ids_{k}", min=0, max=2**40)
        shapes += [{0: ids}, {0: len(keys) * batch[1]}] + ([{0: ids}] if weighted else [])
    return tuple(shapes)


def _flat_index(signature, position: int) -> int:
    return sum(1 if s is None else (3 if s[1] else 2) for s in signature[:position])


def export_program(model: nn.Module, path: str | os.PathLike, dtype: str = "fp32", *,
                   example_inputs: tuple) -> ExportReport:
    """Write ``model``'s inference form as a ``torch.export`` program (``export(..., format="pt2")``).

    The program takes the model's inputs with every ``KeyedJaggedTensor`` flattened to ``values, lengths[,
    weights]`` (see :class:`FlatInputs`), with a dynamic batch size and number of ids per KJT, and loads
    in a process without embtable (nor torchrec)::

        import torch, fbgemm_gpu  # fbgemm_gpu registers the FBGEMM operators the program calls
        served = torch.export.load(path).module()
        logits = served(dense, values, lengths)

    Out-of-range ids are an error (``out_of_range="error"``) through a runtime assertion in the program.
    The metadata (method configs, dtype, input names) is the program's extra file ``embtable.json``.
    """
    import json

    dtype = _check_dtype(dtype)
    path = os.fspath(path)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    modules_fp32 = {p: (_module_bytes(m), _describe(p, m)) for p, m in _table_modules(model)}
    if not modules_fp32:
        raise ValueError(
            f"{type(model).__name__} holds no embtable module to export; compress it first "
            "(embtable.compress(model, budget, method)) or build its tables with embtable"
        )
    served = inference_model(model, dtype)
    signature, flat = FlatInputs.flatten(example_inputs)
    wrapper = FlatInputs(served, signature).eval()
    # size-oblivious reasoning about the batch: no guard "batch != 1" from TorchRec's lengths views, so
    # the program serves a batch of 1 too
    min_batch = 1
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        try:
            program = torch.export.export(wrapper, tuple(flat), dynamic_shapes={"args": _dynamic_shapes(signature, flat)},
                                          strict=False)
        except torch._dynamo.exc.UserError as err:
            if "batch" not in str(err):
                raise
            # a model whose own code guards "batch != 1" (e.g. a transpose + reshape of its pooled bags:
            # the view check specialises a batch of 1) gets a program for batches >= 2 (a server pads a
            # single request), recorded as min_batch; every embtable method serves batch 1
            min_batch = 2
            program = torch.export.export(wrapper, tuple(flat), strict=False,
                                          dynamic_shapes={"args": _dynamic_shapes(signature, flat, min_batch)})
    modules: dict[str, dict[str, Any]] = {}
    table_tensors = []
    for p, m in _table_modules(served):
        own = list(m.parameters()) + list(m.buffers())
        table_tensors.extend(own)
        modules[p] = {**modules_fp32[p][1], "bytes_fp32": modules_fp32[p][0], "bytes": _unique_bytes(own)}
    table_ids = {id(t) for t in table_tensors}
    other = [t for t in list(served.parameters()) + list(served.buffers()) if id(t) not in table_ids]
    from . import __version__

    inputs = []
    for k, spec in enumerate(signature):
        inputs += [f"arg{k}"] if spec is None else [f"arg{k}.values", f"arg{k}.lengths"] + (
            [f"arg{k}.weights"] if spec[1] else [])
    metadata = {
        "format": PT2_FORMAT, "format_version": FORMAT_VERSION, "embtable_version": __version__,
        "torch_version": str(torch.__version__), "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "dtype": dtype, "inputs": inputs, "min_batch": min_batch, "kjt_keys": [None if s is None else s[0] for s in signature],
        "modules": list(modules.values()),
    }
    with atomic_write(path) as f:  # the project's one atomic, durable writer
        torch.export.save(program, f, extra_files={PT2_METADATA: json.dumps(metadata, default=str)})
    return ExportReport(path=path, dtype=dtype, table_bytes_fp32=sum(v[0] for v in modules_fp32.values()),
                        table_bytes=_unique_bytes(table_tensors), other_bytes=_unique_bytes(other),
                        file_bytes=os.path.getsize(path), modules=modules)
