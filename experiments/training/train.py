"""Train and evaluate one configuration: ``run(config) -> RunResult``.

The loop is split into pieces a multi-stage method can reuse (train a supernet, search, retrain):
:func:`make_optimizers`, :func:`train_epochs` (THE training loop: epochs of :func:`train_steps`, resumable
mid-epoch; every stage, runner and distributed rank trains through it) and :func:`evaluate` (AUC /
logloss on a split). :func:`run` strings them together with checkpoints, divergence checks, progress and
the result record.

Embedding rows get sparse gradients and a sparse-capable optimizer (SGD, Adagrad or row-wise Adagrad,
DLRM practice); every other parameter (the model's layers and any dense part of the embedding module)
is trained with Adam.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchrec
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn
from tqdm.auto import tqdm

import ctr_models
import data_prep
import embtable
from embtable.atomic import atomic_write_json
from embtable.fused import FusedTableOptimizer, fused_storages
from embtable.stages import StageFailed
from experiments.training.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from experiments.training.config import RunConfig

__all__ = [
    "RESULT_NAME",
    "RunFailed",
    "RunHooks",
    "RunResult",
    "TrainState",
    "Optimizers",
    "make_optimizers",
    "embedding_modules",
    "batch_loss",
    "resolve_threads",
    "train_steps",
    "train_epochs",
    "loader_epochs",
    "evaluate",
    "run",
    "deterministic",
    "versions",
    "comparable_config",
    "adam_bytes",
    "dataset_path",
]

RESULT_NAME = "result.json"

#: Config fields that do not change what is computed up to a step; a checkpoint made under other values
#: still resumes. A longer run (more epochs or max_steps) continues exactly where a shorter one stopped,
#: since nothing in training depends on the planned total (no schedule). The thread count only changes
#: the order of floating-point sums (a sweep sets it from its number of jobs, so a cell interrupted under
#: ``--jobs 2`` resumes under ``--jobs 1``).
_RESUME_IGNORES = {
    ("name",), ("train", "checkpoint_every"), ("train", "log_every"), ("data", "data_dir"),
    ("train", "epochs"), ("train", "max_steps"), ("train", "num_threads"),
}


class RunFailed(StageFailed):
    """Training or evaluation produced nothing usable (NaN, divergence, constant predictions)."""


@dataclasses.dataclass
class TrainState:
    """Where training stands; saved in every checkpoint.

    Args:
        step: optimizer steps done.
        epoch: current epoch (0-based).
        batch_in_epoch: batches of ``epoch`` already trained on.
        samples: training examples seen.
        train_seconds: time spent in training steps (not evaluation or checkpointing).
        loss_sum / loss_weight: exponential moving average of the loss, without its bias correction.
        last_loss: the loss of the last step.
        history: one record per evaluation during training (step, epochs done as a fraction, smoothed loss,
            valid_auc, valid_logloss).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    loss_sum: float = 0.0
    loss_weight: float = 0.0
    last_loss: float = math.nan
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    #: weight of the past in the smoothed loss (about the last 50 steps count)
    SMOOTHING = 0.98

    def record_loss(self, loss: float) -> None:
        self.last_loss = loss
        self.loss_sum = self.SMOOTHING * self.loss_sum + (1 - self.SMOOTHING) * loss
        self.loss_weight = self.SMOOTHING * self.loss_weight + (1 - self.SMOOTHING)

    @property
    def smoothed_loss(self) -> float:
        """Bias-corrected moving average of the training loss (``nan`` before the first step)."""
        return self.loss_sum / self.loss_weight if self.loss_weight else math.nan


@dataclasses.dataclass
class Optimizers:
    """Adam for the dense parameters, a sparse-capable optimizer for the embedding rows.

    Args:
        dense: Adam over every trainable parameter that is not an embedding table weight.
        sparse: SGD / Adagrad / row-wise Adagrad over the embedding tables (sparse gradients).
        embedding_optimizer: the name of ``sparse``'s kind ("sgd", "adagrad", "rowwise_adagrad").
        fused: some tables train through FBGEMM's fused kernels (``sparse`` then holds their state).
    """

    dense: torch.optim.Optimizer | None
    sparse: Any
    embedding_optimizer: str
    fused: bool = False

    def zero_grad(self) -> None:
        for opt in self._all():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self._all():
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"dense": self.dense.state_dict() if self.dense else None, "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.dense is not None:
            self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])

    def _all(self) -> list[torch.optim.Optimizer]:
        return [self.sparse] if self.dense is None else [self.dense, self.sparse]


@dataclasses.dataclass
class RunHooks:
    """Optional callbacks into a running training (a sweep's pruning, a test's interruption).

    Args:
        on_step: called after every optimizer step with the training state.
        on_eval: called after every validation during training with the record added to the history;
            it may raise (e.g. ``optuna.TrialPruned``) to stop the run.
    """

    on_step: Callable[[TrainState], None] | None = None
    on_eval: Callable[[dict[str, Any]], None] | None = None


@dataclasses.dataclass
class RunResult:
    """The structured record of one run (what sweeps store and reports read).

    Bytes: ``inference_bytes`` is every tensor of the embedding module (``embtable.memory_report``).
    ``training_bytes`` is the embedding module while training with the optimizers actually used: its
    inference bytes, plus the state of ``embedding_optimizer`` for its tables, plus Adam's state for any
    dense parameters inside it (projections etc.). The CTR model's own layers are not embedding bytes;
    they are in ``dense_bytes`` (parameters) and ``dense_training_bytes`` (parameters + Adam state).
    ``full_table_bytes`` is the fp32 size of uncompressed tables for the same features and dim.

    Metrics are ``None`` unless ``status == "ok"``: a failed run never reports an AUC.
    """

    name: str
    config: dict[str, Any]
    versions: dict[str, str]
    seed: int
    status: str
    failure_reason: str | None
    dataset: str
    embedding_optimizer: str
    inference_bytes: int | None
    training_bytes: int | None
    full_table_bytes: int | None
    dense_bytes: int | None
    dense_training_bytes: int | None
    valid_auc: float | None
    valid_logloss: float | None
    test_auc: float | None
    test_logloss: float | None
    bayes_auc: dict[str, float] | None
    train_samples_per_s: float | None
    train_seconds: float
    wall_seconds: float
    steps: int
    epochs: float
    resumed_from_step: int | None
    history: list[dict[str, Any]]
    num_threads: int | None = None  # torch intra-op threads the run used (the bits depend on it)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return dataclasses.asdict(self)


# ----- the table optimizers (fused FBGEMM kernels or sparse gradients): make_optimizers -----
def make_optimizers(model: nn.Module, embedding: nn.Module, embedding_optimizer: str, embedding_lr: float,
                    dense_lr: float, *, fused_tables: bool = False) -> Optimizers:
    """Set up ``embedding``'s tables for training and build the optimizers over ``model``.

    With ``fused_tables`` the plain TorchRec tables of ``embedding`` are replaced by FBGEMM's fused kernel
    (:func:`embtable.fuse_storage`: the update runs in backward; ``sparse`` is then a
    :class:`embtable.fused.FusedTableOptimizer` handle, or a list-combining one when some tables stay
    unfused). Tables that cannot be fused (a method's ``fused_storage_unsupported``, unpooled storage) and
    all tables without ``fused_tables`` get sparse gradients and a Python optimizer.

    Args:
        model: the whole model (its parameters not in the tables go to Adam).
        embedding: the embedding module inside ``model``.
        embedding_optimizer: "sgd", "adagrad" or "rowwise_adagrad".
        embedding_lr: learning rate of the table optimizer.
        dense_lr: Adam's learning rate.
        fused_tables: train the tables with the fused kernels where they can be.
    """
    if embedding_optimizer not in ("sgd", "adagrad", "rowwise_adagrad"):
        raise ValueError(
            f"unknown embedding_optimizer {embedding_optimizer!r}; choose sgd, adagrad or rowwise_adagrad"
        )
    fused = None
    if fused_tables and embtable.fuse_storage(embedding, embedding_optimizer, embedding_lr):
        fused = FusedTableOptimizer(fused_storages(embedding))
    tables = [p for p in embtable.sparse_parameters(embedding) if p.requires_grad]
    if not tables and fused is None:
        raise ValueError(f"{type(embedding).__name__} holds no embedding tables to train")
    table_ids = {id(p) for p in embtable.table_parameters(embedding)}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
    sparse: Any = None
    if tables and embedding_optimizer == "sgd":
        sparse = torch.optim.SGD(tables, lr=embedding_lr)
    elif tables and embedding_optimizer == "adagrad":
        sparse = torch.optim.Adagrad(tables, lr=embedding_lr)
    elif tables:
        sparse = embtable.RowWiseAdagrad(tables, lr=embedding_lr)
    if fused is not None:
        sparse = fused if sparse is None else _BothTableOptimizers(fused, sparse)
    return Optimizers(torch.optim.Adam(dense, lr=dense_lr) if dense else None, sparse, embedding_optimizer,
                      fused=fused is not None)


class _BothTableOptimizers:
    """Fused tables and Python-optimized ones in one model, behind one optimizer-shaped handle."""

    def __init__(self, fused: FusedTableOptimizer, sparse: torch.optim.Optimizer) -> None:
        self.fused, self.sparse = fused, sparse

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.sparse.step()

    def state_dict(self) -> dict[str, Any]:
        return {"fused": self.fused.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fused.load_state_dict(state["fused"])
        self.sparse.load_state_dict(state["sparse"])
# ----- end of the table optimizers -----


def embedding_modules(model: nn.Module) -> list[embtable.EmbeddingModule]:
    """Every embtable module in ``model``, under any attribute name (each once), in module order."""
    return [m for m in model.modules() if isinstance(m, embtable.EmbeddingModule)]


def batch_loss(model: nn.Module, batch: Any,
               modules: Sequence[embtable.EmbeddingModule] | None = None) -> torch.Tensor:
    """Mean binary cross-entropy of ``model`` on ``batch``, plus every ``auxiliary_loss()`` of the embtable
    modules in it (``modules``: default :func:`embedding_modules` of ``model``)."""
    logits = model(batch.dense_features, batch.sparse_features)  # [B]
    loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels.float())
    for module in embedding_modules(model) if modules is None else modules:
        extra = module.auxiliary_loss()
        if extra is not None:
            loss = loss + extra
    return loss


def train_steps(
    model: nn.Module,
    batches: Iterable[Any],
    optimizers: Optimizers,
    state: TrainState,
    *,
    num_steps: int | None = None,
    max_loss: float = math.inf,
    on_step: Callable[[TrainState], None] | None = None,
) -> int:
    """Train on ``batches`` (until exhausted or ``num_steps`` steps), updating ``state`` in place.

    Args:
        model: returns logits ``[B]`` from ``(dense_features, sparse_features)``. Every
            ``embtable.EmbeddingModule`` in it (under any attribute name) adds its ``auxiliary_loss()`` to
            the loss and has its ``train_step_end(step)`` called after each optimizer step.
        batches: ``torchrec.datasets.utils.Batch`` items.
        optimizers: from :func:`make_optimizers` (or any object with ``zero_grad()`` and ``step()``).
        state: advanced by one step, one batch and ``B`` samples per batch.
        num_steps: stop after this many steps.
        max_loss: raise :class:`RunFailed` when the smoothed loss exceeds it.
        on_step: called after each step (checkpoints, evaluation, progress).

    Returns:
        Steps done.

    Raises:
        RunFailed: the loss became NaN / infinite, or diverged above ``max_loss``.
    """
    model.train()
    done = 0
    if num_steps is not None and num_steps <= 0:
        return 0
    modules = embedding_modules(model)
    for batch in batches:
        start = time.perf_counter()
        optimizers.zero_grad()
        loss = batch_loss(model, batch, modules)
        value = loss.item()
        if not math.isfinite(value):
            raise RunFailed(f"training loss is {value} at step {state.step + 1}")
        loss.backward()
        optimizers.step()
        for module in modules:
            module.train_step_end(state.step)
        state.train_seconds += time.perf_counter() - start
        state.step += 1
        state.batch_in_epoch += 1
        state.samples += int(batch.labels.shape[0])
        state.record_loss(value)
        done += 1
        if state.smoothed_loss > max_loss:
            raise RunFailed(
                f"training diverged: smoothed loss {state.smoothed_loss:.4g} > max_loss {max_loss} "
                f"at step {state.step}"
            )
        if on_step is not None:
            on_step(state)
        if num_steps is not None and done >= num_steps:
            break
    return done


def train_epochs(
    model: nn.Module,
    epoch_batches: Callable[[int], Iterable[Any]],
    steps_per_epoch: int,
    total_steps: int,
    optimizers: Optimizers,
    state: TrainState,
    *,
    max_loss: float = math.inf,
    on_step: Callable[[TrainState], None] | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
) -> None:
    """THE training loop: :func:`train_steps` epoch after epoch until ``state.step == total_steps``.

    Every training in the project (a run, each stage of a multi-stage method, a fine-tune, every rank of a
    distributed run) goes through here. It continues from ``state`` (``epoch``, ``batch_in_epoch``): a
    state restored from a checkpoint resumes mid-epoch, skipping the batches already done.

    Args:
        epoch_batches: epoch -> that epoch's training batches (the same order for the same epoch).
        steps_per_epoch: batches per epoch (``len`` of the loader).
        total_steps: train until ``state.step`` reaches it.
        on_epoch_end: called after each complete epoch (validation, checkpoints).
        model, optimizers, state, max_loss, on_step: see :func:`train_steps`.

    Raises:
        RunFailed: see :func:`train_steps`.
        RuntimeError: an epoch yielded fewer batches than ``steps_per_epoch``.
    """
    while state.step < total_steps:
        batches = islice(iter(epoch_batches(state.epoch)), state.batch_in_epoch, None)
        train_steps(model, batches, optimizers, state, num_steps=total_steps - state.step, max_loss=max_loss,
                    on_step=on_step)
        if state.batch_in_epoch >= steps_per_epoch:  # the epoch is complete
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if on_epoch_end is not None:
                on_epoch_end(state)
        elif state.step < total_steps:
            raise RuntimeError(
                f"the training batches yielded {state.batch_in_epoch} batches in epoch {state.epoch}, "
                f"but {steps_per_epoch} were expected"
            )


def loader_epochs(loader: Any) -> Callable[[int], Iterable[Any]]:
    """``epoch -> batches`` of a ``data_prep.BatchLoader`` (it is shuffled per epoch with ``set_epoch``)."""

    def batches(epoch: int) -> Iterable[Any]:
        loader.set_epoch(epoch)
        return loader

    return batches


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], *, split: str = "valid") -> dict[str, float]:
    """AUC and logloss (scikit-learn) of ``model`` on ``batches``.

    Returns:
        ``{"auc": ..., "logloss": ..., "num_examples": ...}``.

    Raises:
        RunFailed: predictions are NaN / infinite, or constant (a collapsed model has no AUC to report).
    """
    was_training = model.training
    model.eval()
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    try:
        for batch in batches:
            logits = model(batch.dense_features, batch.sparse_features)
            probs.append(torch.sigmoid(logits.double()).numpy())
            labels.append(batch.labels.numpy())
    finally:
        model.train(was_training)
    if not probs:
        raise ValueError(f"the {split} split has no examples")
    p, y = np.concatenate(probs), np.concatenate(labels)
    if not np.all(np.isfinite(p)):
        raise RunFailed(f"{np.count_nonzero(~np.isfinite(p))} of {p.size} predictions on {split} are NaN/inf")
    if float(np.ptp(p)) < 1e-9:
        raise RunFailed(f"predictions on {split} are constant ({p[0]:.6g} for all {p.size} examples)")
    if np.unique(y).size < 2:
        raise ValueError(f"the {split} split has only label {y[0]}; AUC needs both classes")
    return {
        "auc": float(roc_auc_score(y, p)),
        "logloss": float(log_loss(y, p, labels=[0, 1])),
        "num_examples": int(p.size),
    }


# ----- threads -----
def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(num_threads: int | None) -> int:
    """``train.num_threads`` as run: ``None`` means ``OMP_NUM_THREADS`` where the environment sets it (a
    shared machine's or a scheduler's choice), else every available core.

    >>> resolve_threads(3)
    3
    """
    if num_threads is not None:
        return int(num_threads)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), available_cores())
    return available_cores()


@contextlib.contextmanager
def deterministic(num_threads: int | None) -> Iterator[None]:
    """Fix the thread count (``None``: all available cores) and deterministic kernels for the run; restore
    the caller's settings after. A run is bitwise reproducible for the same thread count."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(resolve_threads(num_threads))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_num_threads(threads)


@contextlib.contextmanager
def keep_callers_rng() -> Iterator[None]:
    """Leave the caller's torch, NumPy and Python generators as they were (a run seeds or restores its own)."""
    outer = rng_state()
    try:
        yield
    finally:
        set_rng_state(outer)


def dataset_path(data: Any) -> Path:
    """The dataset directory of a ``DataConfig``, generating the preset on first use."""
    if data.path is not None:
        return Path(data.path)
    path = Path(data.data_dir) / data.preset
    if not (path / "meta.json").is_file():
        data_prep.generate_dataset(data.preset, path)
    return path


def versions() -> dict[str, str]:
    """The versions a result records (torch, torchrec, embtable)."""
    return {"torch": torch.__version__, "torchrec": torchrec.__version__, "embtable": embtable.__version__}


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (plain data) without the fields a checkpoint may resume under other values of."""
    out = json.loads(json.dumps(config))
    for path in _RESUME_IGNORES:
        node = out
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return out


def adam_bytes(params: Iterable[nn.Parameter]) -> int:
    """Bytes of ``torch.optim.Adam``'s state for ``params``."""
    # torch.optim.Adam keeps exp_avg and exp_avg_sq (each like the parameter) and a 4-byte step tensor
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)


def run(
    config: RunConfig,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    *,
    hooks: RunHooks | None = None,
) -> RunResult:
    """Train ``config`` and evaluate it on the validation and test splits.

    Args:
        config: the run (see ``experiments.training.config``).
        out_dir: where checkpoints and ``result.json`` go; ``None`` keeps nothing on disk.
        resume: continue from ``out_dir``'s checkpoint if there is one (the result is identical to an
            uninterrupted run); ``False`` starts afresh and overwrites it.
        progress: show a progress bar (batches/s and the smoothed loss).
        hooks: optional callbacks (pruning, tests).

    Returns:
        The run's :class:`RunResult`; ``status`` is ``"failed"`` with a reason when the loss diverged
        or became NaN, when predictions were constant, or when the budget was infeasible.

    Raises:
        ValueError: ``out_dir`` holds a checkpoint of a different config.

    ``train_seconds`` and ``steps`` cover the whole run, resumed parts included; ``wall_seconds`` is
    this call's time only.

    Example (not run as a doctest: training takes seconds to minutes; tests/test_train.py runs it)::

        result = run(load_config("demo"), out_dir="runs/demo")
        result.status, result.test_auc, result.inference_bytes
    """
    wall_start = time.perf_counter()
    hooks = hooks or RunHooks()
    train_cfg = config.train
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT_NAME if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()

    with deterministic(train_cfg.num_threads), keep_callers_rng():
        path = dataset_path(config.data)
        meta = data_prep.load_meta(path)
        features = meta.feature_specs(config.model.embedding_dim)
        full_table_bytes = sum(f.full_table_bytes for f in features)
        torch.manual_seed(train_cfg.seed)
        record = dict(
            name=config.name, config=config_dict, versions=versions(), seed=train_cfg.seed,
            dataset=str(path), embedding_optimizer=train_cfg.embedding_optimizer,
            full_table_bytes=full_table_bytes, bayes_auc=meta.bayes_auc, num_threads=torch.get_num_threads(),
        )
        method = embtable.method_config_from_dict(config.embedding.method, source=f"{config.name}: embedding.method")
        try:
            embedding = embtable.build(
                features, method, config.embedding.budget, pooling=config.embedding.pooling, seed=train_cfg.seed,
                is_weighted=bool(meta.weighted_features),  # per-id weights of multi-hot bags (data_prep.table)
            )
        except embtable.BudgetError as err:
            return _finish(out, wall_start, TrainState(), None, f"infeasible budget: {err}", record)
        model = ctr_models.build_model(config.model.name, embedding, meta.num_dense, **config.model.options)
        optimizers = make_optimizers(
            model, embedding, train_cfg.embedding_optimizer, train_cfg.embedding_lr, train_cfg.dense_lr,
            fused_tables=train_cfg.fused_tables,
        )
        record.update(_byte_counts(model, embedding, train_cfg.embedding_optimizer))

        train_loader = data_prep.BatchLoader(path, "train", train_cfg.batch_size, shuffle=True, seed=train_cfg.seed)
        steps_per_epoch = len(train_loader)
        total_steps = steps_per_epoch * train_cfg.epochs
        if train_cfg.max_steps is not None:
            total_steps = min(total_steps, train_cfg.max_steps)

        state = TrainState()
        resumed_from = None
        saved = load_checkpoint(ckpt_path) if (ckpt_path is not None and resume) else None
        if saved is not None:
            if comparable_config(saved["config"]) != comparable_config(config_dict):
                raise ValueError(
                    f"{ckpt_path} is a checkpoint of a different config; pass resume=False to overwrite it "
                    "or use another out_dir"
                )
            state = TrainState(**saved["state"])
            if state.step > total_steps:
                raise ValueError(
                    f"{ckpt_path} is at step {state.step}, past this config's {total_steps} steps; "
                    "pass resume=False to train afresh or use another out_dir"
                )
            try:
                model.load_state_dict(saved["model"])
                optimizers.load_state_dict(saved["optimizers"])
            except (RuntimeError, KeyError, ValueError) as err:  # same config, another layout of the state
                first = str(err).strip().splitlines()[0][:300]
                raise ValueError(
                    f"{ckpt_path} has the same config but its saved tables do not fit this version of the "
                    f"model ({versions().get('embtable', '?')}): the method's state layout changed since it was "
                    f"written ({first}); pass resume=False (sweeps: delete that file) to train afresh"
                ) from err
            set_rng_state(saved["rng"])
            resumed_from = state.step
        record["resumed_from_step"] = resumed_from

        def checkpoint() -> None:
            if ckpt_path is not None:
                save_checkpoint(ckpt_path, {
                    "config": config_dict, "model": model.state_dict(), "optimizers": optimizers.state_dict(),
                    "state": dataclasses.asdict(state), "rng": rng_state(),
                })

        def validate() -> None:
            metrics = evaluate(model, data_prep.BatchLoader(path, "valid", train_cfg.eval_batch_size, shuffle=False))
            entry = {"step": state.step, "epoch": state.epoch + state.batch_in_epoch / steps_per_epoch,
                     "loss": state.smoothed_loss,
                     "valid_auc": metrics["auc"], "valid_logloss": metrics["logloss"]}
            state.history.append(entry)
            if hooks.on_eval is not None:
                hooks.on_eval(entry)

        bar = tqdm(total=total_steps, initial=state.step, unit="batch", desc=config.name, disable=not progress,
                   dynamic_ncols=True, mininterval=0.5)

        def after_step(s: TrainState) -> None:
            bar.update(1)
            if s.step % train_cfg.log_every == 0:
                bar.set_postfix(loss=f"{s.smoothed_loss:.4f}", refresh=False)
            if train_cfg.eval_every is not None and s.step % train_cfg.eval_every == 0:
                validate()
            if train_cfg.checkpoint_every is not None and s.step % train_cfg.checkpoint_every == 0:
                checkpoint()
            if hooks.on_step is not None:
                hooks.on_step(s)

        try:
            def end_of_epoch(s: TrainState) -> None:
                validate()
                checkpoint()

            train_epochs(model, loader_epochs(train_loader), steps_per_epoch, total_steps, optimizers, state,
                         max_loss=train_cfg.max_loss, on_step=after_step, on_epoch_end=end_of_epoch)
            checkpoint()
            valid = evaluate(model, data_prep.BatchLoader(path, "valid", train_cfg.eval_batch_size, shuffle=False))
            test = evaluate(model, data_prep.BatchLoader(path, "test", train_cfg.eval_batch_size, shuffle=False),
                            split="test")
        except RunFailed as failure:
            record["epochs"] = state.epoch + state.batch_in_epoch / steps_per_epoch
            return _finish(out, wall_start, state, None, failure.reason, record)
        finally:
            bar.close()
        record["epochs"] = state.epoch + state.batch_in_epoch / steps_per_epoch
        metrics = {"valid_auc": valid["auc"], "valid_logloss": valid["logloss"],
                   "test_auc": test["auc"], "test_logloss": test["logloss"]}
        return _finish(out, wall_start, state, metrics, None, record)


def _byte_counts(model: nn.Module, embedding: nn.Module, embedding_optimizer: str) -> dict[str, int]:
    inference = embtable.memory_report(embedding).inference_bytes
    table_state = embtable.optimizer_state_bytes(embedding, embedding_optimizer, tables_only=True)
    embedding_ids = {id(p) for p in embedding.parameters()}
    dense_params = [p for p in model.parameters() if id(p) not in embedding_ids]
    return {
        "inference_bytes": inference,
        "training_bytes": inference + table_state + adam_bytes(embtable.dense_parameters(embedding)),
        "dense_bytes": sum(p.numel() * p.element_size() for p in dense_params),
        "dense_training_bytes": sum(p.numel() * p.element_size() for p in dense_params) + adam_bytes(dense_params),
    }


def _finish(
    out: Path | None,
    wall_start: float,
    state: TrainState,
    metrics: dict[str, float] | None,
    failure: str | None,
    record: dict[str, Any],
) -> RunResult:
    metrics = metrics or {}
    result = RunResult(
        status="ok" if failure is None else "failed",
        failure_reason=failure,
        inference_bytes=record.pop("inference_bytes", None),
        training_bytes=record.pop("training_bytes", None),
        dense_bytes=record.pop("dense_bytes", None),
        dense_training_bytes=record.pop("dense_training_bytes", None),
        valid_auc=metrics.get("valid_auc"),
        valid_logloss=metrics.get("valid_logloss"),
        test_auc=metrics.get("test_auc"),
        test_logloss=metrics.get("test_logloss"),
        train_samples_per_s=state.samples / state.train_seconds if state.train_seconds > 0 else None,
        train_seconds=state.train_seconds,
        wall_seconds=time.perf_counter() - wall_start,
        steps=state.step,
        epochs=record.pop("epochs", 0.0),
        resumed_from_step=record.pop("resumed_from_step", None),
        history=state.history,
        **record,
    )
    if out is not None:
        atomic_write_json(out / RESULT_NAME, result.to_dict())
    return result
