"""experiments.training.train.run on the tiny generated preset: learning, reproducibility, failures, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import data_prep
from experiments.training import checkpoint as ckpt
from experiments.training.config import CONFIG_DIR, ConfigError, config_names, load_config
from experiments.training.train import RESULT_NAME, RunFailed, RunHooks, evaluate, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(data_prep.generate_dataset("tiny", tmp_path_factory.mktemp("data") / "tiny"))


def config(tiny: Path, **train: object):
    return load_config(overrides={"data": {"path": str(tiny)}, "train": {"checkpoint_every": 10, **train}})


class Interrupt(Exception):
    """Stands for a kill: raised from inside the training loop."""


def interrupt_at(step: int) -> RunHooks:
    def on_step(state) -> None:
        if state.step == step:
            raise Interrupt(step)

    return RunHooks(on_step=on_step)


@pytest.mark.parametrize("model", ["dlrm", "deepfm", "dcn_v2", "wide_deep"])
@pytest.mark.parametrize("method", ["full", "hash"])
def test_every_model_learns_with_full_and_hashed_tables(tiny: Path, model: str, method: str) -> None:
    losses: list[float] = []
    cfg = config(tiny, max_steps=40).with_overrides(
        {"model": {"name": model}, "embedding": {"method": {"method": method}, "budget": "1/4" if method == "hash" else None}}
    )
    result = run(cfg, progress=False, hooks=RunHooks(on_step=lambda s: losses.append(s.last_loss)))
    assert result.status == "ok", result.failure_reason
    assert len(losses) == result.steps == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first - 0.02, f"{model}/{method}: loss did not fall ({first:.4f} -> {last:.4f})"
    assert 0.5 < result.valid_auc <= 1 and 0.5 < result.test_auc <= 1
    if method == "hash":
        assert result.inference_bytes <= result.full_table_bytes / 4
    else:
        assert result.inference_bytes == result.full_table_bytes


def test_same_seed_gives_bitwise_identical_weights_and_metrics(tiny: Path, tmp_path: Path) -> None:
    cfg = config(tiny, max_steps=30)
    a = run(cfg, tmp_path / "a", progress=False)
    b = run(cfg, tmp_path / "b", progress=False)
    c = run(cfg.with_overrides({"train": {"seed": 1}}), tmp_path / "c", progress=False)
    weights = {k: ckpt.load_checkpoint(tmp_path / k / ckpt.CHECKPOINT_NAME)["model"] for k in "abc"}
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert (a.valid_auc, a.valid_logloss, a.test_auc, a.test_logloss) == (
        b.valid_auc, b.valid_logloss, b.test_auc, b.test_logloss
    )
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
    assert a.valid_auc != c.valid_auc


def test_interrupted_run_resumes_to_the_identical_result(tiny: Path, tmp_path: Path) -> None:
    cfg = config(tiny, epochs=2, batch_size=512)  # 34 steps an epoch; checkpoints every 10 and at epoch ends
    whole = run(cfg, tmp_path / "whole", progress=False)
    out = tmp_path / "killed"
    with pytest.raises(Interrupt):
        run(cfg, out, progress=False, hooks=interrupt_at(25))  # mid-epoch: last checkpoint at step 20
    with pytest.raises(Interrupt):
        run(cfg, out, progress=False, hooks=interrupt_at(45))  # resumed at 20, killed again in epoch 2
    resumed = run(cfg, out, progress=False)
    assert resumed.resumed_from_step == 40
    assert resumed.steps == whole.steps == 68
    for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss"):
        assert getattr(resumed, key) == getattr(whole, key), key
    assert [h["valid_auc"] for h in resumed.history] == [h["valid_auc"] for h in whole.history]
    a = ckpt.load_checkpoint(tmp_path / "whole" / ckpt.CHECKPOINT_NAME)
    b = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads((out / RESULT_NAME).read_text())["test_auc"] == whole.test_auc


def test_a_checkpoint_of_another_config_is_not_resumed(tiny: Path, tmp_path: Path) -> None:
    run(config(tiny, max_steps=10), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different config"):
        run(config(tiny, max_steps=10, dense_lr=0.01), tmp_path, progress=False)
    fresh = run(config(tiny, max_steps=10, dense_lr=0.01), tmp_path, resume=False, progress=False)
    assert fresh.status == "ok" and fresh.resumed_from_step is None
    with pytest.raises(ValueError, match="past this config's 5 steps"):
        run(config(tiny, max_steps=5, dense_lr=0.01), tmp_path, progress=False)


def test_a_checkpoint_whose_state_layout_changed_says_so(tiny: Path, tmp_path: Path) -> None:
    """Same config, but the method's state_dict keys changed since the checkpoint was written (a new version
    of the method): a clear error naming the file, not torch's load_state_dict traceback."""
    run(config(tiny, max_steps=10), tmp_path, progress=False)
    path = tmp_path / ckpt.CHECKPOINT_NAME
    saved = ckpt.load_checkpoint(path)
    key = next(k for k in saved["model"] if k.startswith("embedding."))
    saved["model"][key.replace("embedding.", "embedding.renamed_", 1)] = saved["model"].pop(key)
    ckpt.save_checkpoint(path, saved)
    with pytest.raises(ValueError, match="saved tables do not fit this version") as err:
        run(config(tiny, max_steps=10), tmp_path, progress=False)
    assert str(path) in str(err.value) and "resume=False" in str(err.value)


def test_a_checkpoint_made_with_another_thread_count_resumes(tiny: Path, tmp_path: Path) -> None:
    # a sweep sets the threads from its number of jobs: a cell killed under --jobs 2 resumes under --jobs 1
    with pytest.raises(Interrupt):
        run(config(tiny, max_steps=15, num_threads=1), tmp_path, progress=False, hooks=interrupt_at(12))
    resumed = run(config(tiny, max_steps=15, num_threads=2), tmp_path, progress=False)
    assert resumed.status == "ok" and resumed.resumed_from_step == 10


def test_a_kill_while_writing_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / ckpt.CHECKPOINT_NAME
    ckpt.save_checkpoint(path, {"step": 1})

    def torn_save(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.CHECKPOINT_NAME]  # no temporary file left


def test_divergence_is_a_failed_run_without_metrics(tiny: Path, tmp_path: Path) -> None:
    result = run(config(tiny, max_steps=30, dense_lr=1e6, embedding_lr=1e6), tmp_path, progress=False)
    assert result.status == "failed"
    assert "diverged" in result.failure_reason or "nan" in result.failure_reason.lower()
    assert result.valid_auc is None and result.test_auc is None
    assert json.loads((tmp_path / RESULT_NAME).read_text())["status"] == "failed"


def test_constant_predictions_are_a_failure_not_auc_one_half(tiny: Path) -> None:
    import ctr_models
    import embtable

    meta = data_prep.load_meta(tiny)
    model = ctr_models.build_model(
        "dlrm", embtable.build(meta.feature_specs(16, with_counts=False), embtable.FullConfig()), meta.num_dense
    )
    with torch.no_grad():
        model.over_arch[-1].weight.zero_()  # the logit no longer depends on the input
    with pytest.raises(RunFailed, match="constant"):
        evaluate(model, data_prep.BatchLoader(tiny, "valid", 512, shuffle=False))
    with torch.no_grad():
        model.over_arch[-1].bias.fill_(math.nan)
    with pytest.raises(RunFailed, match="NaN"):
        evaluate(model, data_prep.BatchLoader(tiny, "valid", 512, shuffle=False))


def test_an_infeasible_budget_is_a_failed_run(tiny: Path) -> None:
    cfg = config(tiny, max_steps=5).with_overrides({"embedding": {"method": {"method": "hash"}, "budget": 64}})
    result = run(cfg, progress=False)
    assert result.status == "failed" and "budget" in result.failure_reason


def test_every_shipped_config_loads() -> None:
    assert {"base", "hash", "deepfm", "dcn_v2", "wide_deep"} <= set(config_names())
    for name in config_names():
        load_config(name)


def test_unknown_yaml_key_names_the_key_the_file_and_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("# a typo on line 4\ntrain:\n  seed: 1\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml:4: unknown key 'train\.learning_rate'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"typo2\.yaml:1: unknown key 'trian'"):
        (tmp_path / "typo2.yaml").write_text("trian: {seed: 1}\n")
        load_config(tmp_path / "typo2.yaml")
    with pytest.raises(ConfigError, match=r"method\.yaml:3.*unknown key.*'num_bucket'"):
        (tmp_path / "method.yaml").write_text("embedding:\n  budget: 1/8\n  method: {method: hash, num_bucket: 8}\n")
        load_config(tmp_path / "method.yaml")
    assert CONFIG_DIR.is_dir()


def test_overrides_replace_whole_method_mappings() -> None:
    qr_like = load_config(overrides={"embedding": {"method": {"method": "hash", "num_buckets": 10}}})
    switched = qr_like.with_overrides({"embedding": {"method": {"method": "full"}}})
    assert switched.embedding.method == {"method": "full"}  # num_buckets is not carried over
    assert load_config(overrides=["train.seed=7", "model.name=deepfm"]).train.seed == 7


def test_run_leaves_the_callers_threads_flags_and_generators_alone(tiny: Path, tmp_path: Path) -> None:
    import random

    import numpy as np

    threads = torch.get_num_threads()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    expected = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    run(config(tiny, max_steps=5, checkpoint_every=2), tmp_path, progress=False)
    longer = run(config(tiny, max_steps=6, checkpoint_every=2), tmp_path, progress=False)  # resumes the first
    assert longer.resumed_from_step == 5 and longer.steps == 6
    assert longer.test_logloss == run(config(tiny, max_steps=6), progress=False).test_logloss  # as if never stopped
    assert (torch.rand(1), np.random.rand(), random.random()) == expected
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("module", ["experiments.training.config", "experiments.training.checkpoint"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_threads_default_to_the_cores_are_recorded_and_reproducible(tiny: Path, monkeypatch) -> None:
    from experiments.sweep.sweep import _share_threads
    from experiments.training.train import available_cores, resolve_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads(None) == available_cores()  # every core the process may use
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads(None) == 1 and resolve_threads(2) == 2  # the environment's choice; explicit wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    first = run(config(tiny, max_steps=4), progress=False)  # num_threads: null in base.yaml
    assert first.num_threads == available_cores() and first.status == "ok"
    again = run(config(tiny, max_steps=4), progress=False)
    assert (again.test_logloss, again.training_bytes) == (first.test_logloss, first.training_bytes)  # bitwise
    two = config(tiny, max_steps=4, num_threads=2).to_dict()
    assert _share_threads(two, 4) == two  # an explicit count is kept
    shared = _share_threads(config(tiny).to_dict(), 64)
    assert shared["train"]["num_threads"] == max(1, available_cores() // 64)


def test_fused_and_unfused_tables_train_alike(tiny: Path) -> None:
    fused = run(config(tiny, max_steps=6, num_threads=1), progress=False)
    plain = run(config(tiny, max_steps=6, num_threads=1, fused_tables=False), progress=False)
    assert fused.training_bytes == plain.training_bytes and fused.inference_bytes == plain.inference_bytes
    assert abs(fused.test_logloss - plain.test_logloss) < 1e-4
