"""The distributed entry point: a run trained on 2 processes with sharded storage equals the same run on one."""

from __future__ import annotations

import pytest

from experiments.training.config import load_config
from experiments.training.distributed import train_distributed
from experiments.training.train import run


@pytest.mark.parametrize("method", ["hash"])
def test_sharded_run_matches_single_process_and_reloads_unsharded(tmp_path, method):
    overrides = [
        f"embedding.method={{method: {method}}}", "embedding.budget=1/4", "train.max_steps=20",
        "train.embedding_optimizer=sgd", "train.embedding_lr=0.1", f"data.data_dir={tmp_path / 'data'}",
    ]
    config = load_config("smoke", overrides=overrides)
    single = run(config, progress=False)
    result = train_distributed(config, tmp_path / "dist", world_size=2, sharding_types=["row_wise"], progress=False)
    assert result["steps"] == single.steps == 20
    assert {t for tables in result["sharding"].values() for t in tables.values()} == {"row_wise"}
    assert result["inference_bytes"] == single.inference_bytes
    # same global batches, same optimizers: only float summation order differs
    assert result["test_auc"] == pytest.approx(single.test_auc, abs=2e-3)
    assert result["test_logloss"] == pytest.approx(single.test_logloss, abs=2e-3)
