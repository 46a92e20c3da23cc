"""Fused storage training (embtable.fuse_storage): same updates as the sparse path, exact bytes, reproducible."""

from __future__ import annotations

import copy

import pytest
import torch
from method_cases import CASES

import embtable
from embtable.fused import FusedEmbeddingBagStorage, fused_storages
from embtable.sharding import storage_modules
from experiments.benchmarks.bench_kernels import zipf_batch
from experiments.training.train import make_optimizers

FEATURES = [embtable.FeatureSpec("a", 500, 8), embtable.FeatureSpec("b", 40, 8), embtable.FeatureSpec("c", 3000, 8)]


def _kjt(seed=0, batch=32):
    return zipf_batch(FEATURES, batch, torch.Generator().manual_seed(seed))


def _train(module, optimizers, steps=2):
    for step in range(steps):
        optimizers.zero_grad()
        loss = module(_kjt(step)).values().pow(2).sum()
        aux = module.auxiliary_loss()
        if aux is not None:
            loss = loss + aux
        loss.backward()
        optimizers.step()
        module.train_step_end(step)


def _build(name):
    case = CASES[name]
    return embtable.build(FEATURES, case.config, case.budget, seed=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_training_equals_sparse_path(name, optimizer="sgd"):
    plain = _build(name)
    fused = copy.deepcopy(plain)
    ref = make_optimizers(plain, plain, optimizer, 0.1, 1e-3, fused_tables=False)
    opts = make_optimizers(fused, fused, optimizer, 0.1, 1e-3, fused_tables=True)
    if not opts.fused:
        reason = getattr(fused, "fused_storage_unsupported", None) or "no plain fp32 tables with dims of 4k"
        pytest.skip(f"{name}: storage not fused ({reason})")
    assert not any(type(m) is torch.nn.EmbeddingBag for s in fused_storages(fused) for m in s.modules())
    assert set(plain.state_dict()) == set(fused.state_dict())
    assert embtable.memory_report(plain).tensors == embtable.memory_report(fused).tensors
    assert (embtable.optimizer_state_bytes(plain, optimizer, tables_only=True)
            == embtable.optimizer_state_bytes(fused, optimizer, tables_only=True))
    _train(plain, ref)
    _train(fused, opts)
    moved = (plain(_kjt(9)).values() - _build(name)(_kjt(9)).values()).abs().max()
    assert moved > 1e-4  # the tables did train
    torch.testing.assert_close(fused(_kjt(9)).values(), plain(_kjt(9)).values(), rtol=1e-5, atol=1e-6)


def test_rowwise_adagrad_state_is_one_float_per_row_and_checkpoints():
    m = embtable.build(FEATURES, embtable.HashConfig(), "1/4", seed=0)
    plain = copy.deepcopy(m)
    ref = make_optimizers(plain, plain, "rowwise_adagrad", 0.1, 1e-3, fused_tables=False)
    opts = make_optimizers(m, m, "rowwise_adagrad", 0.1, 1e-3, fused_tables=True)
    _train(plain, ref, steps=1)
    _train(plain, ref, steps=1)
    rows = sum(c.num_embeddings for s in fused_storages(m) for c in s.embedding_bag_configs())
    assert embtable.optimizer_state_bytes(m, "rowwise_adagrad", tables_only=True) == rows * 4
    with pytest.raises(ValueError, match="fused with"):
        embtable.optimizer_state_bytes(m, "adagrad")
    _train(m, opts, steps=1)
    saved_model, saved_opt = copy.deepcopy(m.state_dict()), opts.state_dict()
    _train(m, opts, steps=1)
    after = m(_kjt(5)).values()
    m.load_state_dict(saved_model)
    opts.load_state_dict(saved_opt)
    _train(m, opts, steps=1)
    assert torch.equal(m(_kjt(5)).values(), after)  # a resumed run equals an uninterrupted one
    torch.testing.assert_close(after, plain(_kjt(5)).values(), rtol=1e-5, atol=1e-6)  # same update as unfused


def test_fused_training_is_bitwise_reproducible_at_fixed_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = []
        for _ in range(2):
            m = embtable.build(FEATURES, embtable.QRConfig(), "1/4", seed=0)
            opts = make_optimizers(m, m, "rowwise_adagrad", 0.1, 1e-3, fused_tables=True)
            _train(m, opts, steps=3)
            outs.append(m(_kjt(7)).values())
        assert torch.equal(outs[0], outs[1])
    finally:
        torch.set_num_threads(threads)


def test_unfuse_gives_plain_collections_with_the_trained_weights():
    m = embtable.build(FEATURES, embtable.FullConfig(), seed=0)
    opts = make_optimizers(m, m, "sgd", 0.1, 1e-3, fused_tables=True)
    _train(m, opts)
    before = m(_kjt(3)).values()
    assert embtable.unfuse_storage(m) == 1
    assert not fused_storages(m) and isinstance(m.storage, torch.nn.Module)
    assert not isinstance(m.storage, FusedEmbeddingBagStorage)
    assert torch.equal(m(_kjt(3)).values(), before)
    assert storage_modules(m)  # what DMP shards again


def test_methods_that_refuse_fusing_say_why():
    m = _build("managed_collision")
    assert m.fused_storage_unsupported and embtable.fuse_storage(m) == 0
