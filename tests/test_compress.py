"""compress(model, budget, method): surgery on user-style models, planning, refusals, initialisation."""

from __future__ import annotations

import pytest
import torch
from compress_models import (
    DeepFMStyle,
    MultiHotBags,
    bags_batch,
    deepfm_batch,
    dlrm,
    dlrm_batch,
)
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)

import embtable
from embtable.compress import EMBTABLE_MODULES, compress, find_tables

TABLE_TYPES = (nn.Embedding, nn.EmbeddingBag, EmbeddingBagCollection, EmbeddingCollection) + EMBTABLE_MODULES


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared: one intra-op thread keeps these small models fast under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def table_bytes(model: nn.Module) -> int:
    """Measured bytes of every top-level table module of the model (each module counted once)."""
    seen, covered, total = set(), [], 0
    for path, m in model.named_modules():
        if any(path.startswith(c + ".") for c in covered) or not isinstance(m, TABLE_TYPES):
            continue
        covered.append(path)
        if id(m) not in seen:
            seen.add(id(m))
            total += embtable.memory_report(m).inference_bytes
    return total


def train(model, batches, steps=25, lr=0.02):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        inputs, y = batches[step % len(batches)]
        logits = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.reshape(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def falls(losses, k=5):
    return sum(losses[-k:]) / k < 0.9 * sum(losses[:k]) / k


# ----- the three user-style models: surgery, budget, training -----
@pytest.mark.parametrize("method", ["hash", "qr"])
def test_deepfm_style_model(method):
    if method not in embtable.registered_methods():
        pytest.skip(f"{method} is not registered")
    torch.manual_seed(0)
    model = DeepFMStyle()
    full_bytes = table_bytes(model)
    new, report = compress(model, "1/8", method, seed=0)
    assert report.budget_bytes == full_bytes // 8
    assert report.bytes_after <= report.budget_bytes
    assert table_bytes(new) == report.bytes_after
    assert len(report.tables) == 10 and report.planning == "global"
    small = {t.key: t.status for t in report.tables}
    assert small["embeddings.4"] == "full" and small["embeddings.0"] == "compressed"
    assert all(isinstance(m, nn.Embedding) for m in model.embeddings)  # the original is untouched
    assert all(isinstance(m, embtable.Embedding) for m in new.embeddings)
    assert type(new).forward is DeepFMStyle.forward
    gen = torch.Generator().manual_seed(1)
    batches = [deepfm_batch(gen) for _ in range(4)]
    assert new(batches[0][0]).shape == model(batches[0][0]).shape == (256,)
    assert falls(train(new, batches))


def test_multi_hot_bag_model():
    torch.manual_seed(0)
    model = MultiHotBags()
    new, report = compress(model, 20_000 * 8 * 4 // 10, embtable.HashConfig(), seed=0)
    assert report.bytes_after <= report.budget_bytes and table_bytes(new) == report.bytes_after
    assert {t.key: t.status for t in report.tables} == {"genres": "full", "history": "compressed",
                                                         "tags": "compressed"}
    assert isinstance(new.tags, embtable.EmbeddingBag) and new.tags.include_last_offset
    assert new.genres.mode == "mean"
    gen = torch.Generator().manual_seed(1)
    batches = [bags_batch(gen) for _ in range(4)]
    assert new(batches[0][0]).shape == (128,)
    assert falls(train(new, batches, lr=0.05))


def test_torchrec_dlrm():
    torch.manual_seed(0)
    model = dlrm()
    gen = torch.Generator().manual_seed(1)
    batches = [dlrm_batch(gen) for _ in range(4)]
    new, report = compress(model, "1/10", embtable.HashConfig(), seed=0, example_inputs=batches[0][0])
    ebc = new.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, embtable.HashEmbeddingBagCollection)  # one feature per table: the method's own module
    assert report.bytes_after <= report.budget_bytes and table_bytes(new) == report.bytes_after
    assert [t.key for t in report.tables] == [f"sparse_arch.embedding_bag_collection/t_{n}"
                                              for n in ("user", "item", "city", "device")]
    assert [t.status for t in report.tables] == ["compressed", "compressed", "full", "full"]
    assert falls(train(new, batches, lr=0.05))
    assert "sparse_arch.embedding_bag_collection/t_user" in report.table()


# ----- degenerate equivalence: method "full" reproduces every kind of table exactly -----
def _shared_ebc(weighted=False):
    tables = [
        EmbeddingBagConfig(name="shared", embedding_dim=4, num_embeddings=100, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="own", embedding_dim=4, num_embeddings=50, feature_names=["f3", "f1"]),
    ]
    return EmbeddingBagCollection(tables=tables, is_weighted=weighted)


def _kjt(keys, gen, rows=50, batch=3, weighted=False):
    lengths = torch.randint(0, 3, (len(keys) * batch,), generator=gen)
    values = torch.randint(0, rows, (int(lengths.sum()),), generator=gen)
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


@pytest.mark.parametrize("weighted", [False, True])
def test_shared_tables_in_a_collection(weighted):
    torch.manual_seed(0)
    model = nn.Sequential(_shared_ebc(weighted))
    new, report = compress(model, None, "full")
    assert isinstance(new[0], embtable.grouped.GroupedEmbeddingBagCollection)
    assert [t.feature_names for t in report.tables] == [("f1", "f2"), ("f3", "f1")]
    kjt = _kjt(["f1", "f2", "f3"], torch.Generator().manual_seed(0), weighted=weighted)
    a, b = model(kjt), new(kjt)
    assert a.keys() == b.keys() == ["f1@shared", "f2", "f3", "f1@own"]
    assert torch.equal(a.values(), b.values())
    # and compressed: one hashed table still serves both features
    small, report = compress(model, 0.5, embtable.HashConfig(), seed=0)
    assert small[0](kjt).values().shape == a.values().shape
    assert report.bytes_after <= report.budget_bytes


def test_embedding_collection_unpooled():
    torch.manual_seed(0)
    tables = [EmbeddingConfig(name="seq", embedding_dim=4, num_embeddings=100, feature_names=["clicks", "views"]),
              EmbeddingConfig(name="q", embedding_dim=4, num_embeddings=30, feature_names=["query"])]
    ec = EmbeddingCollection(tables=tables, need_indices=True)
    new, _ = compress(ec, None, "full")
    kjt = _kjt(["clicks", "views", "query"], torch.Generator().manual_seed(0), rows=30)
    a, b = ec(kjt), new(kjt)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].values(), b[k].values()) and torch.equal(a[k].lengths(), b[k].lengths())
        assert torch.equal(a[k].weights(), b[k].weights())
    hashed, report = compress(ec, "1/3", embtable.HashConfig(), seed=0)
    out = hashed(kjt)
    assert {k: v.values().shape for k, v in out.items()} == {k: v.values().shape for k, v in a.items()}
    assert report.bytes_after <= report.budget_bytes


def test_full_method_is_exact_for_single_modules():
    torch.manual_seed(0)
    model = MultiHotBags()
    new, report = compress(model, None, "full")
    assert all(t.status == "full" and t.init == "trained weights copied" for t in report.tables)
    batch, _ = bags_batch(torch.Generator().manual_seed(2))
    assert torch.equal(model(batch), new(batch))
    deepfm = DeepFMStyle([100, 10], dim=4)
    new, _ = compress(deepfm, None, "full")
    x = torch.tensor([[3, 9], [99, 0]])
    assert torch.equal(deepfm(x), new(x))


def test_shared_module_replaced_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.user = nn.Embedding(1000, 4)
            self.also_user = self.user

        def forward(self, a, b):
            return (self.user(a) * self.also_user(b)).sum(-1)

    model = Tied()
    new, report = compress(model, "1/4", embtable.HashConfig(), seed=0)
    assert len(report.tables) == 1 and report.tables[0].paths == ("user", "also_user")
    assert new.user is new.also_user and isinstance(new.user, embtable.Embedding)


def test_inplace_swaps_the_modules_of_the_given_model():
    model = DeepFMStyle([1000, 10], dim=4)
    head = model.mlp
    same, report = compress(model, "1/2", "hash", inplace=True)
    assert same is model and model.mlp is head and isinstance(model.embeddings[0], embtable.Embedding)
    assert table_bytes(model) == report.bytes_after


# ----- initialisation from trained weights -----
def test_hash_rows_start_as_the_mean_of_their_ids():
    model = nn.Sequential(nn.Embedding(1000, 4))
    new, report = compress(model, None, embtable.HashConfig(num_buckets=100, hash_fn="modulo"))
    assert report.tables[0].init.startswith("mean of the trained rows")
    got = new[0](torch.tensor([7, 42]))
    w = model[0].weight.detach()
    assert torch.allclose(got[0], w[7::100].mean(0)) and torch.allclose(got[1], w[42::100].mean(0))
    _, random = compress(model, None, embtable.HashConfig(num_buckets=100), init_from_weights=False)
    assert random.tables[0].init == "random"


def _table_model(weight: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Embedding(*weight.shape))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    return model


@pytest.mark.parametrize("combiner", ["multiply", "add", "concat"])
def test_qr_partitions_fit_a_trained_table_of_their_form(combiner):
    """A trained table that IS a QR table (rows a[id % m] (op) b[id // m]) is recovered exactly."""
    gen = torch.Generator().manual_seed(0)
    m, n = 50, 1000
    a, b = torch.rand(m, 4, generator=gen) + 0.5, torch.rand(n // m, 4, generator=gen) + 0.5
    ids = torch.arange(n)
    r, q = a[ids % m], b[ids // m]
    weight = {"multiply": r * q, "add": r + q, "concat": torch.cat([r[:, :2], q[:, 2:]], 1)}[combiner]
    config = embtable.QRConfig(num_collisions=m, combiner=combiner)
    fitted, report = compress(_table_model(weight), None, config, seed=0)
    assert "fitted to the trained rows" in report.tables[0].init
    assert torch.allclose(fitted[0](ids), weight, atol=1e-4)
    random, _ = compress(_table_model(weight), None, config, seed=0, init_from_weights=False)
    assert not torch.allclose(random[0](ids), weight, atol=1e-1)


def test_low_rank_starts_from_the_svd_of_the_trained_table():
    if "low_rank" not in embtable.registered_methods():
        pytest.skip("low_rank is not registered")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(500, 2, generator=gen) @ torch.randn(2, 8, generator=gen)  # rank 2
    fitted, report = compress(_table_model(weight), None, embtable.config_class("low_rank")(rank=2))
    assert report.tables[0].init.startswith("truncated SVD")
    assert torch.allclose(fitted[0](torch.arange(500)), weight, atol=1e-4)


# ----- planning: dry run, exclude, budget errors -----
def test_dry_run_plans_without_touching_the_model():
    model = DeepFMStyle()
    before = [id(m) for m in model.modules()]
    same, planned = compress(model, "1/8", embtable.HashConfig(), dry_run=True)
    assert same is model and [id(m) for m in model.modules()] == before and planned.dry_run
    _, done = compress(model, "1/8", embtable.HashConfig(), seed=0)
    assert [(t.key, t.rows, t.bytes_after) for t in planned.tables] == [
        (t.key, t.rows, t.bytes_after) for t in done.tables]
    assert "DRY RUN" in planned.table()


def test_exclude_keeps_tables_and_counts_them_in_the_budget():
    model = DeepFMStyle()
    new, report = compress(model, "1/4", embtable.HashConfig(), exclude=["embeddings.1"], seed=0)
    assert isinstance(new.embeddings[1], nn.Embedding) and new.embeddings[1] is not model.embeddings[1]
    row = {t.key: t for t in report.tables}["embeddings.1"]
    assert row.status == "excluded" and row.bytes_after == row.bytes_before == 5_000 * 8 * 4
    assert report.bytes_after <= report.budget_bytes and table_bytes(new) == report.bytes_after
    with pytest.raises(ValueError, match="no table named 'embeddings.9'.*embeddings.0"):
        compress(model, "1/4", "hash", exclude=["embeddings.9"])
    with pytest.raises(embtable.BudgetError, match="used up"):
        compress(model, 100_000, "hash", exclude=["embeddings.0"])


def test_counts_reach_the_planner():
    import numpy as np

    model = DeepFMStyle([2000, 10], dim=4)
    popular = np.zeros(2000, dtype=np.int64)
    popular[-50:] = 100  # the most frequent ids are the last ones
    with pytest.raises(ValueError, match=r"counts given for unknown table\(s\) \['user'\]"):
        compress(model, "1/4", "hash", counts={"user": popular})
    with pytest.raises(ValueError, match="embeddings.0.*counts must have shape"):
        compress(model, "1/4", "hash", counts={"embeddings.0": popular[:10]})
    if "optembed" in embtable.registered_methods():  # keeps the most frequent ids: the counted ones
        new, report = compress(model, "1/4", "optembed", counts={"embeddings.0": popular}, seed=0)
        assert report.bytes_after <= report.budget_bytes
        kept = new.embeddings[0].collection.kept_ids()["embeddings_0"]
        assert set(range(1950, 2000)) <= set(kept.tolist()) and len(kept) < 2000


def test_shared_storage_methods_are_planned_per_module_and_say_so():
    """unified shares one table across the features of a module: each replaced module gets its own byte cap."""
    import json

    if "unified" not in embtable.registered_methods():
        pytest.skip("unified is not registered")
    model = DeepFMStyle([20_000, 5_000, 30], dim=8)  # dims 8 and 1: one shared table cannot serve both
    new, report = compress(model, "1/4", "unified", seed=0)
    assert report.planning == "per module" and any("planned per module" in n for n in report.notes)
    assert report.bytes_after <= report.budget_bytes and table_bytes(new) == report.bytes_after
    assert {t.key: t.status for t in report.tables}["embeddings.2"] == "full"  # small modules stay full
    assert json.loads(json.dumps(report.to_dict()))["planning"] == "per module"


def test_budget_errors_are_raised_before_any_change():
    model = DeepFMStyle()
    with pytest.raises(embtable.BudgetError):
        compress(model, 100, "hash")
    with pytest.raises(embtable.BudgetError, match="full"):
        compress(model, "1/2", "full")
    with pytest.raises(ValueError, match="holds no nn.Embedding"):
        compress(nn.Linear(3, 4), "1/2", "hash")


# ----- refusals: never silent -----
@pytest.mark.parametrize("table, problem", [
    (nn.Embedding(100, 4, max_norm=1.0), "max_norm=1.0"),
    (nn.Embedding(100, 4, scale_grad_by_freq=True), "scale_grad_by_freq"),
    (nn.EmbeddingBag(100, 4, mode="max"), "mode='max'"),
    (nn.Embedding(100, 4, dtype=torch.float16), "torch.float16"),
])
def test_unsupported_settings_are_refused_or_skipped_with_reason(table, problem):
    model = nn.ModuleDict({"odd": table, "ok": nn.Embedding(5000, 4)})
    with pytest.raises(ValueError, match=rf"(?s)cannot compress .* at 'odd'.*{problem}.*exclude=\['odd'\]"):
        compress(model, "1/4", "hash")
    new, report = compress(model, "1/4", "hash", on_unsupported="skip")
    assert report.skipped.keys() == {"odd"} and problem in report.skipped["odd"]
    assert type(new["odd"]) is type(table) and isinstance(new["ok"], embtable.Embedding)
    assert report.bytes_after <= report.budget_bytes
    assert find_tables(model)[0]["problems"]


def test_subclasses_with_their_own_forward_are_refused():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return 2 * super().forward(ids)

    class Named(nn.Embedding):  # no behaviour of its own: a plain table
        pass

    with pytest.raises(ValueError, match="Scaled overrides Embedding.forward"):
        compress(nn.ModuleDict({"a": Scaled(1000, 4)}), "1/4", "hash")
    new, _ = compress(nn.ModuleDict({"a": Named(1000, 4)}), "1/4", "hash")
    assert isinstance(new["a"], embtable.Embedding)


def test_tied_weights_are_refused():
    class TiedOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(500, 8)
            self.out = nn.Linear(8, 500, bias=False)
            self.out.weight = self.emb.weight

    with pytest.raises(ValueError, match=r"out.weight.*tied weights"):
        compress(TiedOutput(), "1/4", "hash")


def test_example_inputs_find_tables_whose_weight_is_read_directly():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.user = nn.Embedding(1000, 4)
            self.item = nn.Embedding(1000, 4)

        def forward(self, u, i):
            return (nn.functional.embedding(u, self.user.weight) * self.item(i)).sum(-1)

    model, args = ReadsWeight(), (torch.tensor([1, 2]), torch.tensor([3, 4]))
    blind, _ = compress(model, "1/4", "hash")
    with pytest.raises(AttributeError, match="weight"):  # without example inputs: loud at the first forward
        blind(*args)
    with pytest.raises(ValueError, match=r"(?s)'user'.*did not call it through its forward"):
        compress(model, "1/4", "hash", example_inputs=args)
    new, report = compress(model, "3/4", "hash", example_inputs=args, on_unsupported="skip")
    assert report.skipped.keys() == {"user"} and isinstance(new.item, embtable.Embedding)
    assert new(*args).shape == (2,) and "checked on example_inputs" in report.table()


def test_per_sample_weights_on_a_mean_bag_still_fail_loudly():
    model = nn.Sequential(nn.EmbeddingBag(1000, 4, mode="mean"))
    new, _ = compress(model, "1/4", "hash")
    ids, offsets, w = torch.tensor([1, 2, 3]), torch.tensor([0, 2]), torch.ones(3)
    with pytest.raises((ValueError, NotImplementedError, RuntimeError)):
        model[0](ids, offsets, per_sample_weights=w)
    with pytest.raises(ValueError, match="per_sample_weights"):
        new[0](ids, offsets, per_sample_weights=w)


@pytest.mark.parametrize("name", sorted(embtable.registered_methods()))
def test_every_registered_method_compresses_a_model(name):
    """Any registered method plugs in: planned across tables (or per module), within the budget."""
    torch.manual_seed(0)
    model = DeepFMStyle([20_000, 5_000, 30], dim=8)
    config = embtable.config_class(name)()
    budget = None if name == "full" else "1/4"
    try:
        new, report = compress(model, budget, config, seed=0)
    except ValueError as err:  # a method may need something a plain model cannot give: it must say so
        pytest.skip(f"{name}: {err}")
    if budget is not None:
        assert report.bytes_after <= report.budget_bytes
    assert table_bytes(new) == report.bytes_after
    x, _ = deepfm_batch(torch.Generator().manual_seed(0), batch=16, cardinalities=[20_000, 5_000, 30])
    assert new(x).shape == (16,)
