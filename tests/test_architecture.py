"""The architecture's rules, checked on the code: methods own their knowledge, callers use the hooks.

- No Python code outside ``embtable/methods/`` names a method (a string constant equal to a method name)
  or tests a class by its name (``type(x).__name__ == ...``): a new method plugs into compress, export and
  the trainer through the hooks of :class:`embtable.EmbeddingModule`, without editing those files.
  Docstrings, YAML configs and Markdown may name methods (they are documentation).
- The trainer finds every ``EmbeddingModule`` in a model under any attribute name: it adds their
  ``auxiliary_loss()`` and calls their ``train_step_end(step)`` after each optimizer step.
- ``compress`` initialises through ``init_from_weights``, ``export`` serves ``inference_module()``.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import embtable
from embtable.methods.full import FullConfig, FullEmbeddingBagCollection

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("embtable", "ctr_models", "experiments")
# the methods of the VLDB 2024 benchmark's taxonomy (DESIGN.md), registered or not yet; "full", the
# uncompressed baseline every comparison is made against, is not a compression method and may be named
METHOD_NAMES = {
    "hash", "qr", "unified", "low_rank", "mixed_dim", "optembed", "cafe", "robe", "tt_rec", "dhe", "dpq", "mgqe",
    "pep", "low_precision", "managed_collision",
}


def _method_class_names() -> set[str]:
    """Names of every EmbeddingModule subclass and method config class defined in embtable.methods."""
    import embtable.methods

    for info in pkgutil.iter_modules(embtable.methods.__path__):
        importlib.import_module(f"embtable.methods.{info.name}")
    names, todo = set(), [embtable.EmbeddingModule, embtable.MethodConfig]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("embtable.methods."):
                names.add(sub.__name__)
            todo.append(sub)
    return names


def _documentation_nodes(tree: ast.AST) -> set[int]:
    """Docstrings, and the names a module exports in ``__all__`` (the public API lists method classes)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                out.update(id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def method_knowledge(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each string constant naming a method or a method's class, and each comparison
    with a ``__name__`` / ``__qualname__`` attribute, in Python ``source`` (docstrings and ``__all__`` are
    skipped).

    >>> method_knowledge('x = {"method": "hash"}\\nif type(m).__name__ == "Foo": pass\\n"Docs name qr."')
    [(1, "names method 'hash'"), (2, 'tests a class by name')]
    """
    names = (METHOD_NAMES | set(embtable.registered_methods())) - {"full"}
    classes = _method_class_names()
    tree = ast.parse(source)
    docs = _documentation_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value in names:
                found.append((node.lineno, f"names method {node.value!r}"))
            elif node.value in classes:
                found.append((node.lineno, f"names method class {node.value!r}"))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr in ("__name__", "__qualname__") for s in sides):
                found.append((node.lineno, "tests a class by name"))
    return sorted(found)


def test_no_code_outside_the_methods_names_a_method():
    offenders = []
    for root in SCANNED:
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("embtable", "methods"):
                continue
            offenders += [f"{rel}:{line}: {what}" for line, what in method_knowledge(path.read_text())]
    assert not offenders, (
        "code outside embtable/methods/ names a method or tests a class by name; move the knowledge into the "
        "method as a hook (embtable/module.py), read names from embtable.registered_methods() or a config "
        "class's `method`, or put defaults in a YAML config:\n" + "\n".join(offenders)
    )


def test_the_scan_sees_what_it_must():
    assert method_knowledge("m = 'low_rank'") == [(1, "names method 'low_rank'")]
    assert method_knowledge("ok = isinstance(m, A) and type(m).__qualname__ != 'B'") == [(1, "tests a class by name")]
    assert method_knowledge("c = 'OptEmbedSupernet'") == [(1, "names method class 'OptEmbedSupernet'")]
    assert method_knowledge('if __name__ == "__main__":\n    main()\nx = "full"\ny = f"hash {z}"') == []
    assert method_knowledge('__all__ = ["QRConfig"]\n__all__ += ["HashConfig"]') == []


# ----- the trainer drives the hooks of every EmbeddingModule, wherever it sits -----
class _Probe(FullEmbeddingBagCollection):
    """A full table that records the trainer's calls and adds a known auxiliary loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps_ended: list[int] = []

    def auxiliary_loss(self) -> torch.Tensor:
        return torch.tensor(100.0)

    def train_step_end(self, step: int) -> None:
        self.steps_ended.append(step)


class _Nested(nn.Module):
    """A model that keeps its tables under an attribute not called ``embedding``."""

    def __init__(self) -> None:
        super().__init__()
        self.towers = nn.ModuleDict({"user": _Probe([embtable.FeatureSpec("a", 10, 4)], FullConfig())})
        self.head = nn.Linear(4 + 1, 1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(torch.cat([dense, self.towers["user"](sparse).values()], dim=1)).squeeze(1)


def _batches(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [
        Batch(dense_features=torch.randn(4, 1, generator=g),
              sparse_features=KeyedJaggedTensor.from_lengths_sync(["a"], torch.randint(0, 10, (4,), generator=g),
                                                                   torch.ones(4, dtype=torch.int64)),
              labels=torch.tensor([0, 1, 0, 1]))
        for _ in range(n)
    ]


def test_the_trainer_adds_auxiliary_losses_and_calls_train_step_end_under_any_name():
    from experiments.training.train import (
        TrainState,
        batch_loss,
        embedding_modules,
        make_optimizers,
        train_steps,
    )

    model = _Nested()
    probe = model.towers["user"]
    assert embedding_modules(model) == [probe]
    batch = _batches(1)[0]
    bce = nn.functional.binary_cross_entropy_with_logits(model(batch.dense_features, batch.sparse_features),
                                                         batch.labels.float())
    assert float(batch_loss(model, batch)) == pytest.approx(float(bce) + 100.0)
    optimizers = make_optimizers(model, probe, "sgd", 0.1, 0.01)
    state = TrainState()
    assert train_steps(model, _batches(5), optimizers, state, num_steps=3) == 3
    assert probe.steps_ended == [0, 1, 2]
    assert state.last_loss > 100.0  # the auxiliary loss is in the trained loss


# ----- compress and export call the hooks -----
class _Served(FullEmbeddingBagCollection):
    def inference_module(self) -> nn.Module:
        served = FullEmbeddingBagCollection(self.logical_features, self.config)
        served.load_state_dict(self.state_dict())
        served.is_serving_form = True
        return served


def test_export_serves_each_modules_inference_module():
    from embtable.export import inference_model

    model = nn.Sequential(nn.Identity(), _Served([embtable.FeatureSpec("a", 10, 4)], FullConfig()))
    served = inference_model(model)
    assert type(served[1]) is FullEmbeddingBagCollection and served[1].is_serving_form
    assert type(model[1]) is _Served  # the trained model is untouched


def test_compress_initialises_through_the_hook_and_reports_a_method_without_one():
    weight = torch.randn(50, 4)
    model = nn.ModuleDict({"t": nn.Embedding.from_pretrained(weight, freeze=False)})
    _, report = embtable.compress(model, None, FullConfig())
    assert report.tables[0].init == "trained weights copied"

    class NoInit(FullEmbeddingBagCollection):
        def init_from_weights(self, name, weight):
            return super(FullEmbeddingBagCollection, self).init_from_weights(name, weight)  # the default: raises

    from embtable.compress import _initialise

    module = NoInit([embtable.FeatureSpec("t", 50, 4)], FullConfig())
    assert _initialise(module, "t", weight).startswith("random (NoInit has no initialisation")


def test_building_a_module_consumes_torchs_fx_tracing_notice_silently():
    import logging

    from torch.fx import _symbolic_trace

    import embtable.module as module

    notice = getattr(_symbolic_trace, "is_fx_tracing_warning", None)
    if notice is None:
        pytest.skip("this torch has no is_fx_tracing notice")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(_symbolic_trace.__name__)
    logger.addHandler(handler)
    notice.cache_clear()
    module._fx_notice_done = False
    try:
        FullEmbeddingBagCollection([embtable.FeatureSpec("a", 10, 4)], FullConfig())
        KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1]), torch.tensor([1]))  # where torch logs it
        logger.warning("another torch message")  # other records still pass
    finally:
        logger.removeHandler(handler)
    assert notice.cache_info().currsize == 1 and seen == ["another torch message"]
