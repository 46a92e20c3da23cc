"""The generic stage runner (experiments.training.stages) on a toy method declaring two stages: a run
killed in stage 2 (in its prepare, or mid-training) and resumed ends exactly as an uninterrupted run, and
finished stages are not trained again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import embtable
from embtable.methods.full import FullConfig, FullEmbeddingBagCollection
from embtable.stages import Pipeline, Stage, StageContext, StageOutput, declared_pipelines
from experiments.training.config import load_config
from experiments.training.stages import COMPACT_NAME, DataSource, StageHooks, run_stages

SIZES = {"a": 40, "b": 12}


class Killed(Exception):
    """Stands for a kill."""


class _Toy(FullEmbeddingBagCollection):
    """A toy method (not registered): full tables, then a second stage that starts from half the trained
    rows plus seeded noise and the first stage's dense layers, and fine-tunes."""

    kill_in_prepare = False

    @classmethod
    def training_pipelines(cls):
        return (Pipeline("toy", FullConfig.method, dict, lambda options: (
            Stage("warm", cls._warm, max_steps=options.get("warm_steps", 6), epochs=1),
            Stage("tune", cls._tune, max_steps=5, epochs=2),
        )),)

    @staticmethod
    def _warm(context: StageContext) -> StageOutput:
        return StageOutput(embedding=_Toy(context.features, FullConfig(), **context.build_kwargs),
                           record={"warm_built": True})

    @staticmethod
    def _tune(context: StageContext) -> StageOutput:
        if _Toy.kill_in_prepare:
            raise Killed
        tuned = _Toy(context.features, FullConfig(), **context.build_kwargs)
        with torch.no_grad():
            for name, bag in tuned.storage.embedding_bags.items():
                trained = context.embedding.storage.embedding_bags[name].weight
                bag.weight.copy_(0.5 * trained + 0.01 * torch.randn_like(trained))
        auc = context.evaluate(context.model, "valid")["auc"]
        return StageOutput(embedding=tuned, keep_dense=True, record={"warm_valid_auc": auc})


def _source() -> DataSource:
    rng = np.random.default_rng(0)
    effects = {k: rng.normal(0, 1.5, n) for k, n in SIZES.items()}

    def batches(seed: int, count: int) -> list[Batch]:
        r = np.random.default_rng(seed)
        out = []
        for _ in range(count):
            ids = {k: r.integers(0, n, 32) for k, n in SIZES.items()}
            dense = r.normal(size=(32, 2)).astype(np.float32)
            logit = sum(effects[k][ids[k]] for k in SIZES) + dense[:, 0]
            labels = (r.random(32) < 1 / (1 + np.exp(-logit))).astype(np.int64)
            kjt = KeyedJaggedTensor(keys=list(SIZES), values=torch.from_numpy(np.concatenate(list(ids.values()))),
                                    lengths=torch.ones(32 * len(SIZES), dtype=torch.int32))
            out.append(Batch(dense_features=torch.from_numpy(dense), sparse_features=kjt,
                             labels=torch.from_numpy(labels)))
        return out

    valid, test = batches(1, 4), batches(2, 4)
    return DataSource(name="toy", features=[embtable.FeatureSpec(k, n, 4) for k, n in SIZES.items()], num_dense=2,
                      train_batches=lambda epoch: iter(batches(100 + epoch, 4)), steps_per_epoch=4,
                      valid_batches=lambda: iter(valid), test_batches=lambda: iter(test))


def _config():
    return load_config(overrides={
        "model": {"name": "dlrm", "embedding_dim": 4, "options": {"dense_hidden_sizes": [8], "over_hidden_sizes": [8]}},
        "train": {"seed": 3, "checkpoint_every": 2, "embedding_lr": 0.1, "dense_lr": 0.01},
    })


def _run(out: Path, hooks: StageHooks | None = None) -> dict:
    return run_stages(_config(), _Toy.training_pipelines()[0], {}, out, source=_source(), progress=False, hooks=hooks)


def _compact(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / COMPACT_NAME, weights_only=True)["state_dict"]


@pytest.mark.parametrize("where", ["prepare", "training"])
def test_a_run_killed_in_stage_two_resumes_to_the_uninterrupted_result(tmp_path: Path, where: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    full = _run(tmp_path / "full")
    assert full["status"] == "ok", full["failure_reason"]
    assert (full["warm_steps"], full["tune_steps"], full["steps"]) == (4, 5, 5)  # one epoch caps warm at 4
    assert set(full["stage_seconds"]) == {"warm", "tune"} and full["warm_built"]
    assert 0 < full["warm_valid_auc"] < 1 and 0 < full["test_auc"] < 1

    out = tmp_path / "killed"
    hooks = None
    if where == "prepare":
        monkeypatch.setattr(_Toy, "kill_in_prepare", True)
    else:
        def kill(stage: str, state) -> None:
            if stage == "tune" and state.step == 3:  # after the checkpoint at step 2
                raise Killed
        hooks = StageHooks(on_step=kill)
    with pytest.raises(Killed):
        _run(out, hooks)
    assert (out / "warm.pt").is_file() and ((out / "tune.pt").is_file() == (where == "training"))
    warm_checkpoint = (out / "warm.pt").stat().st_mtime_ns
    monkeypatch.setattr(_Toy, "kill_in_prepare", False)

    trained: list[tuple[str, int]] = []
    resumed = _run(out, StageHooks(on_step=lambda stage, state: trained.append((stage, state.step))))
    # warm is not trained again; tune from its start, or from its checkpoint at step 2
    assert trained == [("tune", step) for step in range(1 if where == "prepare" else 3, 6)]
    assert (out / "warm.pt").stat().st_mtime_ns == warm_checkpoint
    for key in ("warm_valid_auc", "valid_auc", "valid_logloss", "test_auc", "test_logloss", "inference_bytes",
                "warm_steps", "tune_steps", "method_config"):
        assert resumed[key] == full[key], key
    a, b = _compact(tmp_path / "full"), _compact(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_other_options_is_refused_and_pipelines_come_from_the_methods(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    pipe = _Toy.training_pipelines()[0]
    with pytest.raises(ValueError, match="another run"):
        run_stages(_config(), pipe, {"warm_steps": 3}, tmp_path / "run", source=_source(), progress=False)
    declared = declared_pipelines()
    assert {"optembed", "svd"} <= set(declared) and "toy" not in declared  # the toy method is not registered
    assert all(p.method in embtable.registered_methods() for p in declared.values())
