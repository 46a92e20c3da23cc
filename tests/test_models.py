"""ctr_models: blocks against their definitions, DLRM against TorchRec's, dims checks, drop-in tables."""

from __future__ import annotations

import doctest
import importlib
import itertools

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM as TorchRecDLRM

import ctr_models
import embtable
from ctr_models import DLRM, CrossNetV2, DotInteraction, FMInteraction, build_model

NUM_DENSE = 5
B = 8


def ebc(dims: dict[str, int], num_embeddings: int = 30) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f"t_{f}", num_embeddings=num_embeddings, embedding_dim=d, feature_names=[f])
            for f, d in dims.items()
        ]
    )


def batch(features: list[str], num_embeddings: int = 30, seed: int = 0) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 3, (len(features) * B,), generator=g)  # some bags empty
    values = torch.randint(0, num_embeddings, (int(lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=features, values=values, lengths=lengths)
    return torch.randn(B, NUM_DENSE, generator=g), kjt


MODEL_NAMES = ["dlrm", "deepfm", "dcn_v2", "wide_deep"]


def test_registry_lists_every_model() -> None:
    assert ctr_models.model_names() == sorted(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("method", [embtable.FullConfig(), embtable.HashConfig()], ids=["full", "hash"])
def test_models_take_embtable_modules_and_train_their_rows(name: str, method: embtable.MethodConfig) -> None:
    feats = [embtable.FeatureSpec(f, 30, 4) for f in ("a", "b", "c")]
    embedding = embtable.build(feats, method, budget="1/2" if method.method == "hash" else None, seed=0)
    model = build_model(name, embedding, NUM_DENSE)
    tables = embtable.sparse_parameters(embedding)
    dense, kjt = batch(["a", "b", "c"])
    logits = model(dense, kjt)
    assert logits.shape == (B,)
    logits.sum().backward()
    for table in tables:
        assert table.grad is not None and table.grad.is_sparse  # only touched rows carry a gradient
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"


def test_dlrm_equals_torchrec_dlrm_with_the_same_weights() -> None:
    torch.manual_seed(0)
    dims = {"a": 4, "b": 4, "c": 4}
    theirs = TorchRecDLRM(ebc(dims), NUM_DENSE, dense_arch_layer_sizes=[16, 4], over_arch_layer_sizes=[8, 1])
    ours = DLRM(ebc(dims), NUM_DENSE, dense_hidden_sizes=[16], over_hidden_sizes=[8])
    ours_params, theirs_params = list(ours.parameters()), list(theirs.parameters())
    assert [p.shape for p in ours_params] == [p.shape for p in theirs_params]
    with torch.no_grad():
        for mine, other in zip(ours_params, theirs_params):
            mine.copy_(other)
    dense, kjt = batch(list(dims))
    torch.testing.assert_close(ours(dense, kjt), theirs(dense, kjt).squeeze(1))


@pytest.mark.parametrize("name", ["dlrm", "deepfm"])
def test_one_dim_models_name_the_features_whose_dims_differ(name: str) -> None:
    with pytest.raises(ValueError, match=r"dim 8: \['odd'\]") as err:
        build_model(name, ebc({"a": 4, "b": 4, "odd": 8}), NUM_DENSE)
    assert "dcn_v2" in str(err.value)  # says what to do instead


@pytest.mark.parametrize("name", ["dcn_v2", "wide_deep"])
def test_per_feature_dims_are_accepted(name: str) -> None:
    model = build_model(name, ebc({"a": 4, "b": 2, "c": 7}), NUM_DENSE)
    dense, kjt = batch(["a", "b", "c"])
    assert model(dense, kjt).shape == (B,)


def test_build_model_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        build_model("xdeepfm", ebc({"a": 4}), NUM_DENSE)
    with pytest.raises(ValueError, match=r"does not take \['hidden_size'\]"):
        build_model("deepfm", ebc({"a": 4}), NUM_DENSE, hidden_size=[3])


def test_dot_interaction_is_every_distinct_pair_once() -> None:
    x = torch.randn(3, 5, 4)
    expected = torch.stack([(x[:, i] * x[:, j]).sum(-1) for i, j in itertools.combinations(range(5), 2)], 1)
    torch.testing.assert_close(DotInteraction(5)(x), expected)


def test_fm_interaction_is_the_sum_of_pairwise_dots() -> None:
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    expected = sum((x[:, i] * x[:, j]).sum(-1) for i, j in itertools.combinations(range(6), 2))
    torch.testing.assert_close(FMInteraction()(x), expected)


def test_cross_layer_follows_the_paper() -> None:
    net = CrossNetV2(4, num_layers=1)
    x0 = torch.randn(2, 4)
    layer = net.layers[0]
    torch.testing.assert_close(net(x0), x0 * (x0 @ layer.weight.T + layer.bias) + x0)


@pytest.mark.parametrize(
    "module", ["blocks", "layout", "dlrm", "deepfm", "dcn", "wide_deep", "registry"]
)
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(f"ctr_models.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_deepfm_scales_the_second_order_term_by_the_field_count():
    # the FM term sums F(F-1)/2 dot products; DeepFM scales it by 1/F (F = sparse fields + the dense field)
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

    from ctr_models import DeepFM
    from ctr_models.blocks import FMInteraction

    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{f}", num_embeddings=10, embedding_dim=4, feature_names=[f]) for f in "abc"])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list("abc"), values=torch.tensor([1, 2, 3, 4, 5, 6]),
                                              lengths=torch.ones(6, dtype=torch.int64))
    dense = torch.randn(2, 3)
    scaled, plain = DeepFM(ebc, num_dense=3, hidden_sizes=[8]), DeepFM(ebc, num_dense=3, hidden_sizes=[8], fm_scale=1.0)
    plain.load_state_dict(scaled.state_dict())
    assert scaled.fm_scale == 0.25
    fields = torch.cat([scaled.dense_field(dense).unsqueeze(1), ebc(kjt).values().view(2, 3, 4)], dim=1)
    fm = FMInteraction()(fields)
    torch.testing.assert_close(plain(dense, kjt) - scaled(dense, kjt), 0.75 * fm)
