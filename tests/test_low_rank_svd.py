"""Post-training low-rank compression: train full, compress by SVD, fine-tune (tiny preset)."""

from __future__ import annotations

import json

import pytest

from experiments.training.config import load_config
from experiments.training.stages import RESULT_NAME, run_stages


@pytest.mark.parametrize("moments", ["table", "data"])
def test_train_compress_finetune(tmp_path, moments):
    config = load_config("smoke", overrides=[f"data.data_dir={tmp_path / 'data'}", "train.max_steps=30",
                                             "embedding.budget=1/4"])
    result = run_stages(config, "svd", {"moments": moments, "finetune_steps": 10}, tmp_path / "run", progress=False)
    assert result["status"] == "ok", result["failure_reason"]
    assert set(result["stage_seconds"]) == {"full", "compress", "finetune"}
    assert result["inference_bytes"] <= result["full_inference_bytes"] // 4
    assert result["finetune_steps"] == 10
    assert any(r is not None for r in result["ranks"].values())
    assert 0.5 < result["compressed"]["test_auc"] < 1.0
    assert 0.5 < result["test_auc"] < 1.0  # fine-tuned
    # compression of a trained table keeps most of what it learned
    assert result["compressed"]["test_auc"] > result["full"]["test_auc"] - 0.05
    assert json.loads((tmp_path / "run" / RESULT_NAME).read_text()) == result
