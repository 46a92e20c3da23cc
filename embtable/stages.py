"""Training stages a method declares (optional hook); a trainer runs, checkpoints and resumes them.

Most methods train in one go. A few need several stages, each building its embedding module from what
the previous stage trained: OptEmbed trains a supernet, searches it, then retrains the compact table;
post-training low-rank compression trains full tables, compresses them by SVD, then fine-tunes. Such a
method declares :class:`Pipeline` s from its module class's ``training_pipelines()`` classmethod
(:class:`embtable.EmbeddingModule`'s default declares none); :func:`declared_pipelines` collects them.

Each :class:`Stage` has a ``prepare(context)`` that returns a :class:`StageOutput`: the stage's new
embedding module (the trainer builds the CTR model around it, optionally keeping the previous model's
dense layers), facts for the result record, and in-memory data for later stages. The trainer then
trains the model for the stage's length (or not: a search or a compression trains nothing), writes a
checkpoint per stage, and on a re-run skips finished stages (calling their ``prepare`` again to rebuild
their modules, then loading what they trained) and resumes an interrupted one. ``prepare`` must
therefore be deterministic given the context (the trainer seeds torch with the run's seed before each
call); a long stage that trains nothing saves its progress with ``context.save_progress`` and resumes
from ``context.progress``.

The trainer is not part of ``embtable`` (``experiments.training.stages.run_stages`` is one); it reaches
the method only through these objects.

Example (a one-stage pipeline that trains full tables for one epoch):

    >>> import embtable
    >>> def tables(context):
    ...     return StageOutput(embedding=embtable.build(context.features, embtable.FullConfig(), seed=context.seed))
    >>> p = Pipeline("plain", "full", dict, lambda options: (Stage("train", tables, epochs=1),))
    >>> [s.name for s in p.stages(p.options())]
    ['train']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .config import method_class, registered_methods
from .features import FeatureSpec

__all__ = ["StageFailed", "Stage", "StageContext", "StageOutput", "Pipeline", "declared_pipelines", "options_dict"]


class StageFailed(Exception):
    """Training or evaluation produced nothing usable (NaN, divergence, constant predictions).

    The trainer's ``evaluate`` raises it (or a subclass); a stage may catch it, e.g. a search scores a
    collapsed candidate as 0.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class StageContext:
    """What the trainer hands a stage's ``prepare``.

    Attributes:
        features: the run's categorical features (at the model's embedding dim, with counts when known).
        budget_bytes: the run's byte budget for the final tables (``None``: none given).
        options: the pipeline's options object (an instance of :attr:`Pipeline.options`).
        seed: the run's seed.
        build_kwargs: keyword arguments for building embedding modules of this run (``pooling``,
            ``is_weighted``).
        embedding: the previous stage's embedding module, trained (``None`` in the first stage).
        model: the previous stage's whole model, trained (``None`` in the first stage).
        carried: each earlier stage's :attr:`StageOutput.carry`, by stage name.
        evaluate: ``(model, split) -> {"auc", "logloss", ...}`` on ``"valid"`` or ``"test"``; raises
            :class:`StageFailed` when the predictions are NaN or constant.
        train_batches: ``epoch -> batches`` of the training split (``torchrec`` ``Batch`` es).
        progress: what this stage saved with ``save_progress`` before it was interrupted (``None`` when it
            starts afresh).
        save_progress: checkpoint plain data (dicts, lists, numbers, strings) from which the stage resumes.
    """

    features: list[FeatureSpec]
    budget_bytes: int | None
    options: Any
    seed: int
    build_kwargs: dict[str, Any]
    embedding: nn.Module | None
    model: nn.Module | None
    carried: dict[str, Any]
    evaluate: Callable[[nn.Module, str], dict[str, float]]
    train_batches: Callable[[int], Iterable[Any]]
    progress: Any = None
    save_progress: Callable[[Any], None] = lambda data: None


@dataclasses.dataclass
class StageOutput:
    """What a stage's ``prepare`` returns.

    Attributes:
        embedding: the stage's new embedding module (the trainer builds the run's CTR model around it);
            ``None`` continues with the previous stage's model.
        keep_dense: start the new model's layers outside the embedding module from the previous model's.
        record: JSON-able facts added to the run's result record.
        carry: in-memory data for later stages (their ``context.carried[name]``).
    """

    embedding: nn.Module | None = None
    keep_dense: bool = False
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    carry: Any = None


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a pipeline.

    Args:
        name: the stage's name (its checkpoint is ``<name>.pt``; its seconds are recorded under it).
        prepare: ``(StageContext) -> StageOutput``; builds the stage's module from the previous stage's
            result (it may itself do the stage's work, e.g. a search or a compression).
        train: whether the trainer then trains the model.
        epochs / max_steps: how long: ``epochs`` epochs, capped at ``max_steps`` steps (``None``: no cap);
            ``max_steps`` steps alone when ``epochs`` is ``None``; with both ``None``, the run config's
            ``train.epochs`` and ``train.max_steps``.
    """

    name: str
    prepare: Callable[[StageContext], StageOutput]
    train: bool = True
    epochs: int | None = None
    max_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A multi-stage way to train a method's tables.

    Args:
        name: how runs and sweep specs name it (a sweep entry's ``runner``).
        method: the registered method whose tables the last stage produces.
        options: a class whose keyword arguments are the pipeline's options (a frozen dataclass that
            validates itself); ``options()`` gives the defaults.
        stages: ``options -> stages`` in order.
    """

    name: str
    method: str
    options: Callable[..., Any]
    stages: Callable[[Any], Sequence[Stage]]

    def option_names(self) -> tuple[str, ...]:
        """The valid option names (the fields of a dataclass ``options``)."""
        if dataclasses.is_dataclass(self.options):
            return tuple(f.name for f in dataclasses.fields(self.options))
        return ()


def declared_pipelines() -> dict[str, Pipeline]:
    """Every pipeline the registered methods declare, by name.

    Raises:
        ValueError: two methods declare pipelines of the same name.
    """
    found: dict[str, Pipeline] = {}
    for config_cls in registered_methods().values():
        for pipeline in method_class(config_cls).training_pipelines():
            if pipeline.name in found:
                raise ValueError(f"two pipelines are named {pipeline.name!r} (methods {found[pipeline.name].method!r} "
                                 f"and {pipeline.method!r})")
            found[pipeline.name] = pipeline
    return found


def options_dict(options: Any) -> Mapping[str, Any]:
    """An options object as plain data (a dataclass's fields, or a mapping)."""
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
