"""The contract every registered method obeys, checked for each one (see tests/method_cases.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from method_cases import CASES
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.models.dlrm import DLRM

import embtable
from embtable import FeatureSpec

METHODS = sorted(embtable.registered_methods())
DIM = 8


def make_features(dim: int = DIM) -> list[FeatureSpec]:
    rng = np.random.default_rng(0)
    out = []
    for name, n in [("a", 1000), ("b", 50), ("c", 3000)]:
        counts = rng.zipf(1.3, size=n).clip(max=10_000)  # heavy-tailed popularity
        out.append(FeatureSpec(name, n, dim, counts=counts))
    return out


def make_kjt(features, batch=6, seed=0, weighted=False, max_len=3, empty_bags=True) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for f in features:
        lo = 0 if empty_bags else 1
        ls = torch.randint(lo, max_len + 1, (batch,), generator=g)
        lengths.append(ls)
        values.append(torch.randint(0, f.num_embeddings, (int(ls.sum()),), generator=g))
    values_t = torch.cat(values)
    weights = torch.rand(values_t.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=[f.name for f in features], values=values_t, lengths=torch.cat(lengths), weights=weights)


def build(method: str, features=None, seed=0, **kwargs):
    case = CASES[method]
    return embtable.build(features or make_features(), case.config, case.budget, seed=seed, **kwargs)


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the module's tensors (independent of memory_report)."""
    seen, total = set(), 0
    skip = embtable.memory.training_only_names(module)  # sketches, query tables: training bytes only
    named = list(module.named_parameters()) + list(module.named_buffers())
    for t in [t for name, t in named if name not in skip]:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def test_every_method_is_covered():
    assert set(METHODS) == set(CASES), f"methods without a contract case: {set(METHODS) - set(CASES)}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_layout_matches_embedding_bag_collection(method, pooling, weighted):
    features = make_features()
    module = build(method, features, pooling=pooling, is_weighted=weighted)
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f.name, num_embeddings=f.num_embeddings, embedding_dim=f.embedding_dim,
                                   feature_names=[f.name], pooling=PoolingType[pooling.upper()]) for f in features],
        is_weighted=weighted,
    )
    kjt = make_kjt(features, weighted=weighted)
    out, ref = module(kjt), ebc(kjt)
    assert out.keys() == ref.keys()
    assert out.length_per_key() == ref.length_per_key()
    assert out.offset_per_key() == ref.offset_per_key()
    assert out.values().shape == ref.values().shape and out.values().dtype == ref.values().dtype
    assert [c.num_embeddings for c in module.embedding_bag_configs()] == [f.num_embeddings for f in features]
    assert [c.feature_names for c in module.embedding_bag_configs()] == [[f.name] for f in features]
    assert module.is_weighted() == weighted
    # empty bags pool to zero, as in EmbeddingBagCollection
    empty = (kjt.lengths().view(len(features), -1) == 0)
    for i, key in enumerate(out.keys()):
        rows = out[key][empty[i]]
        assert torch.count_nonzero(rows) == 0


@pytest.mark.parametrize("method", METHODS)
def test_keys_in_another_order_and_extra_keys(method):
    features = make_features()
    module = build(method, features)
    kjt = make_kjt(features)
    d = kjt.to_dict()
    extra = KeyedJaggedTensor.from_jt_dict({"zzz": d["a"], "c": d["c"], "a": d["a"], "b": d["b"]})
    assert torch.equal(module(extra).values(), module(kjt).values())
    with pytest.raises(KeyError, match="lacks feature"):
        module(KeyedJaggedTensor.from_jt_dict({"a": d["a"]}))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_trainable_tensor(method):
    features = make_features()
    module = build(method, features)
    module.train()
    kjt = make_kjt(features, batch=64, max_len=4)
    out = module(kjt).values()
    (out * torch.randn_like(out)).sum().backward()
    aux = module.auxiliary_loss()
    if aux is not None:
        aux.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{method}: no gradient reached {name}"
        grad = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        assert torch.count_nonzero(grad) > 0, f"{method}: zero gradient at {name}"


@pytest.mark.parametrize("method", METHODS)
def test_reported_bytes_equal_storage_and_plan_and_fit_budget(method):
    features = make_features()
    case = CASES[method]
    module = build(method, features)
    report = embtable.memory_report(module)
    assert report.inference_bytes == storage_bytes(module)
    plan = embtable.plan(features, case.config, case.budget)
    assert plan.total_bytes == report.inference_bytes
    if case.budget is not None:
        budget = embtable.as_budget(case.budget).resolve(features)
        assert report.inference_bytes <= budget
        assert report.inference_bytes >= 0.95 * budget, "the planner should use >= 95% of a reachable budget"
    # the training footprint adds the state of the optimizer actually used
    params = list(module.parameters())
    for name, opt in [("sgd", torch.optim.SGD(params, lr=0.1)), ("adagrad", torch.optim.Adagrad(params, lr=0.1)),
                      ("adam", torch.optim.Adam(params, lr=0.1)),
                      ("rowwise_adagrad", None)]:
        if opt is None:
            tables = set(map(id, embtable.table_parameters(module)))
            opt = embtable.RowWiseAdagrad([p for p in params if id(p) in tables], lr=0.1)
            others = [p for p in params if id(p) not in tables]
            opt2 = torch.optim.Adagrad(others, lr=0.1) if others else None
        else:
            opt2 = None
        module.zero_grad()
        out = module(make_kjt(features, batch=32)).values()
        out.sum().backward()
        opt.step()
        if opt2 is not None:
            opt2.step()
        state = sum(t.numel() * t.element_size() for o in [opt, opt2] if o is not None
                    for s in o.state.values() for t in s.values() if torch.is_tensor(t))
        training_only = sum(t.numel() * t.element_size() for n, t in
                            list(module.named_parameters()) + list(module.named_buffers())
                            if n in embtable.memory.training_only_names(module))
        assert embtable.training_bytes(module, name) == report.inference_bytes + training_only + state, name


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_and_seed(method):
    features = make_features()
    a, b = build(method, features, seed=1), build(method, features, seed=2)
    kjt = make_kjt(features)
    assert not torch.equal(a(kjt).values(), b(kjt).values()), "different seeds should initialise differently"
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    assert torch.equal(a(kjt).values(), b(kjt).values())
    assert torch.equal(a(kjt).values(), build(method, features, seed=1)(kjt).values())


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch(method):
    features = make_features()
    module = build(method, features)
    kjt = KeyedJaggedTensor(keys=[f.name for f in features], values=torch.empty(0, dtype=torch.int64),
                            lengths=torch.empty(0, dtype=torch.int64), stride=0)
    out = module(kjt)
    assert out.values().shape == (0, DIM * len(features))
    kjt = KeyedJaggedTensor(keys=[f.name for f in features], values=torch.empty(0, dtype=torch.int64),
                            lengths=torch.zeros(3 * len(features), dtype=torch.int64))
    assert torch.count_nonzero(module(kjt).values()) == 0


@pytest.mark.parametrize("method", METHODS)
def test_large_ids(method):
    """ids above 2**24 and 2**32 are mapped with integer arithmetic, never through float."""
    if not CASES[method].huge_ids:
        pytest.skip(f"{method} stores every row; a 2**33-row table is not built in a unit test")
    features = [FeatureSpec("big", 2**33 + 7, DIM), FeatureSpec("small", 100, DIM)]
    module = embtable.build(features, CASES[method].config, budget=2**20, seed=0)
    ids = torch.tensor([2**24, 2**24 + 1, 2**31 + 3, 2**33 + 6, 5])
    kjt = KeyedJaggedTensor(keys=["big", "small"], values=torch.cat([ids, torch.tensor([1])]),
                            lengths=torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0]))
    out = module(kjt)["big"]
    assert torch.isfinite(out).all()
    # neighbouring ids above 2**24 are not merged (float32 would map both to the same value)
    assert not torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match=r"feature 'big': id 8589934599 is outside .*\[0, 8589934599\)"):
        module(KeyedJaggedTensor(keys=["big", "small"], values=torch.tensor([2**33 + 7]),
                                 lengths=torch.tensor([1, 0])))


@pytest.mark.parametrize("method", METHODS)
def test_out_of_range_policies(method):
    features = make_features()
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.tensor([3, -1, 2999]),
                            lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"feature 'b': id -1 is outside the table's range \[0, 50\)"):
        build(method, features)(kjt)
    wrapped = build(method, features, out_of_range="wrap")
    same = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.tensor([3, 49, 2999]), lengths=torch.tensor([1, 1, 1]))
    assert torch.equal(wrapped(kjt).values(), wrapped(same).values())
    reserved = build(method, features, out_of_range="reserved")
    assert [c.num_embeddings for c in reserved.embedding_bag_configs()] == [1001, 51, 3001]
    assert torch.isfinite(reserved(kjt).values()).all()
    too_big = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.tensor([2**31 + 1, 0, 0]),
                                lengths=torch.tensor([1, 1, 1]))
    assert torch.equal(reserved(too_big)["a"], reserved(KeyedJaggedTensor(
        keys=["a", "b", "c"], values=torch.tensor([1000, 0, 0]), lengths=torch.tensor([1, 1, 1])))["a"])


@pytest.mark.parametrize("method", METHODS)
def test_invalid_configs_say_how_to_fix(method):
    case = CASES[method]
    for make in case.invalid:
        with pytest.raises((ValueError, TypeError)) as err:
            make()
        assert len(str(err.value)) > 20
    if case.budget is not None:
        with pytest.raises(embtable.BudgetError, match="budget"):  # 8 bytes: below every method's smallest
            embtable.build(make_features(), case.config, budget=8)  # (pep's: 14 bytes, bucket pointers + 1 weight)
    with pytest.raises(ValueError, match="unknown key"):
        embtable.method_config_from_dict({"method": method, "no_such_knob": 1})


@pytest.mark.parametrize("method", METHODS)
def test_inside_torchrec_dlrm(method):
    features = make_features()
    module = build(method, features)
    model = DLRM(embedding_bag_collection=module, dense_in_features=4, dense_arch_layer_sizes=[16, DIM],
                 over_arch_layer_sizes=[16, 1])
    kjt = make_kjt(features, batch=16, empty_bags=False)
    logits = model(torch.randn(16, 4), kjt)
    assert logits.shape == (16, 1)
    logits.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_degenerate_equivalence_with_embedding_bag_collection(method, pooling, weighted):
    case = CASES[method]
    if case.degenerate is None:
        pytest.skip(case.why_no_degenerate)
    features = make_features()
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f.name, num_embeddings=f.num_embeddings, embedding_dim=f.embedding_dim,
                                   feature_names=[f.name], pooling=PoolingType[pooling.upper()]) for f in features],
        is_weighted=weighted,
    )
    module, pairs = case.degenerate(features, ebc, {"pooling": pooling, "is_weighted": weighted})
    kjt = make_kjt(features, batch=32, weighted=weighted)
    out, ref = module(kjt).values(), ebc(kjt).values()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(ref)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert pairs
    for mine, theirs in pairs:
        g1 = mine.grad.to_dense() if mine.grad.is_sparse else mine.grad
        g2 = theirs.grad.to_dense() if theirs.grad.is_sparse else theirs.grad
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_sparse_updates_touch_only_used_rows(method):
    features = make_features()
    module = build(method, features)
    tables = embtable.sparse_parameters(module)
    assert tables, f"{method} has no embedding tables for sparse updates"
    before = [t.detach().clone() for t in tables]
    opt = torch.optim.SGD(tables, lr=1.0)
    kjt = make_kjt(features, batch=2, max_len=1, empty_bags=False)
    module(kjt).values().sum().backward()
    assert all(t.grad is None or t.grad.is_sparse for t in tables)
    opt.step()
    changed = sum(int((a != b).any(dim=-1).sum()) for a, b in zip(before, tables))
    total = sum(t.shape[0] for t in tables)
    assert 0 < changed < total


@pytest.mark.parametrize("method", METHODS)
def test_budget_error_names_the_smallest_budget_it_can_meet(method):
    """An unreachable budget raises BudgetError naming N (bytes), and planning at N succeeds."""
    case = CASES[method]
    features = make_features()
    config = case.config if case.budget is not None else embtable.registered_methods()[method]()
    with pytest.raises(embtable.BudgetError) as err:
        embtable.plan(features, config, budget=1)
    smallest = err.value.smallest_bytes
    assert smallest is not None and f"{smallest:,} bytes" in str(err.value), str(err.value)
    plan = embtable.plan(features, config, budget=smallest)
    assert plan.total_bytes <= smallest
