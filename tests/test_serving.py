"""Serving: no graph breaks under torch.compile, and torch.export programs that load without embtable.

Tracing is slow on a CPU, so the work is shared: one model holds a tiny DLRM per method (a "zoo"), it is
traced once per check, and the per-method tests read their row of the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from method_cases import CASES
from test_contract import make_features, make_kjt
from torch import nn

import embtable
from ctr_models import DLRM
from embtable import export as E

METHODS = sorted(embtable.registered_methods())

# THE one list of methods that are not traceable yet (method -> why). A method added here is still run by
# every test below, as an expected failure; remove it from here once it traces.
NOT_TRACEABLE: dict[str, str] = {}

TRACEABLE = [m for m in METHODS if m not in NOT_TRACEABLE]
# dtypes beyond fp32/int8 (the same quantised storage for every method): checked on two methods
FEW = [m for m in ("full", "hash") if m in TRACEABLE]
NUM_DENSE = 3


def method_param(method: str):
    marks = [pytest.mark.xfail(reason=NOT_TRACEABLE[method], strict=False)] if method in NOT_TRACEABLE else []
    return pytest.param(method, marks=marks)


def dlrm(method: str, seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    features = make_features()
    case = CASES[method]
    module = embtable.build(features, case.config, case.budget, seed=seed)
    return DLRM(module, num_dense=NUM_DENSE, dense_hidden_sizes=[8], over_hidden_sizes=[8])


class Zoo(nn.Module):
    """One DLRM per method over the same inputs: ``(dense, kjt) -> [num methods, B]``."""

    def __init__(self, methods: list[str]) -> None:
        super().__init__()
        self.methods = list(methods)
        self.models = nn.ModuleList([dlrm(m) for m in methods])

    def forward(self, dense: torch.Tensor, kjt) -> torch.Tensor:
        return torch.stack([model(dense, kjt) for model in self.models])


def inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, NUM_DENSE, generator=g), make_kjt(make_features(), batch=batch, seed=seed)


def explain(model: nn.Module, *args):
    torch._dynamo.reset()
    # TorchRec's KeyedJaggedTensor reads its lengths per key back as Python ints: captured as symbolic
    # ints (as TorchRec's own compile tests do) instead of breaking the graph
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        return torch._dynamo.explain(model)(*args)


def _breaks(result) -> list[str]:
    return [f"{b.reason.splitlines()[0][:200]} at {[f'{s.filename}:{s.lineno}' for s in b.user_stack[-2:]]}"
            for b in result.break_reasons]


@pytest.fixture(scope="module")
def zoo_explained():
    """One trace of every method expected to compile as one graph (each listed break is checked on its own)."""
    torch.set_num_threads(1)
    zoo = [m for m in METHODS if m not in GRAPH_BREAKS]
    result = explain(Zoo(zoo).eval(), *inputs(4))
    return zoo, result.graph_count, _breaks(result)


# Methods that export (torch.export handles the branch) but still break a torch.compile graph (method -> why)
GRAPH_BREAKS: dict[str, str] = {}


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.xfail(reason=GRAPH_BREAKS[m], strict=True)) if m in GRAPH_BREAKS
    else m for m in METHODS])
def test_no_graph_breaks_in_dlrm(method, zoo_explained):
    zoo, graphs, breaks = zoo_explained
    if method in zoo and graphs == 1 and not breaks:
        return  # the whole zoo (this method included) is one graph
    result = explain(dlrm(method).eval(), *inputs(4))  # on its own: say which break is this method's
    assert result.graph_break_count == 0, _breaks(result)


def test_compile_fullgraph_forward_backward():
    """torch.compile(fullgraph=True) runs training steps (forward + backward) over FEW methods and matches eager.

    The ``aot_eager`` backend traces forward and backward as Inductor would, without its C++ build (slow on
    CPU); ``experiments/benchmarks/bench_serving.py`` runs Inductor.
    """
    torch._dynamo.reset()
    model, reference = Zoo(FEW), Zoo(FEW)
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        for step, batch in enumerate((4,)):
            dense, kjt = inputs(batch, seed=step)
            out, ref = compiled(dense, kjt), reference(dense, kjt)
            torch.testing.assert_close(out, ref)
            out.sum().backward()
            ref.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in reference.named_parameters():
        g = grads[n].to_dense() if grads[n].is_sparse else grads[n]
        torch.testing.assert_close(g, p.grad.to_dense() if p.grad.is_sparse else p.grad, msg=n)


def test_traced_error_policy_is_a_runtime_assert():
    """Under tracing an out-of-range id still fails (an assertion in the graph), in eager with the message."""
    model = dlrm("full").eval()
    dense, kjt = inputs(2)
    bad = E.FlatInputs(model, E.FlatInputs.flatten((dense, kjt))[0])
    values = kjt.values().clone()
    values[0] = 10**6
    with pytest.raises(ValueError, match="outside the table's range"):
        bad(dense, values, kjt.lengths())
    program = torch.export.export(bad, (dense, kjt.values(), kjt.lengths()), strict=False)
    with pytest.raises(RuntimeError, match="outside its table's range"):
        program.module()(dense, values, kjt.lengths())


# ----- torch.export programs, loaded in a process where embtable cannot be imported -----
# every method at fp32; the quantised rows (one storage class for all methods) on FEW, to keep the test fast
EXPORTS = {"fp32": TRACEABLE, "int8": FEW, "fp16": FEW, "int4": FEW}
TOLERANCE = 1e-5  # the program against the eager inference form of the same dtype (same arithmetic)

LOADER = textwrap.dedent("""
    import sys

    class NoEmbtable:  # any import of embtable (or of the training stack) fails in this process
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("embtable", "ctr_models", "torchrec"):
                raise ImportError(f"{name} must not be needed to serve")
            return None

    sys.meta_path.insert(0, NoEmbtable())
    import json
    import torch
    import fbgemm_gpu  # noqa: F401  (the FBGEMM operators the program calls)

    folder = sys.argv[1]
    cases = torch.load(folder + "/inputs.pt")
    out = {}
    for dtype in sys.argv[2:]:
        extra = {"embtable.json": ""}
        served = torch.export.load(f"{folder}/{dtype}.pt2", extra_files=extra).module()
        min_batch = json.loads(extra["embtable.json"])["min_batch"]
        out[dtype] = [served(*args) if args[0].shape[0] >= min_batch else None for args in cases]
        bad = [t.clone() for t in cases[1]]  # batch 7: every program serves it
        bad[1][0] = 2**40
        try:
            served(*bad)
            out[dtype + ":bad"] = "no error"
        except RuntimeError as err:
            out[dtype + ":bad"] = str(err)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("embtable", "ctr_models", "torchrec"))
    assert not loaded, loaded
    torch.save(out, folder + "/outputs.pt")
""")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("pt2")
    example = inputs(4)
    # batch 1, batch 7 with empty bags, batch 3 with no ids at all for some features
    cases = [inputs(1, seed=1), inputs(7, seed=2), inputs(3, seed=3)]
    flat = [[d, k.values(), k.lengths()] for d, k in cases]
    torch.save(flat, folder / "inputs.pt")
    reference, reports = {}, {}
    for dtype, methods in EXPORTS.items():
        zoo = Zoo(methods).eval()
        reports[dtype] = E.export(zoo, folder / f"{dtype}.pt2", dtype, format="pt2", example_inputs=example)
        eager = E.inference_model(zoo, dtype)
        with torch.no_grad():
            reference[dtype] = [(eager(d, k), zoo(d, k)) for d, k in cases]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    run = subprocess.run([sys.executable, "-I", "-c", LOADER, str(folder), *EXPORTS], capture_output=True,
                         text=True, env=env, cwd=str(folder), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return reference, torch.load(folder / "outputs.pt"), reports, folder


@pytest.mark.parametrize("dtype", list(EXPORTS))
@pytest.mark.parametrize("method", [method_param(m) for m in METHODS])
def test_pt2_program_loads_without_embtable_and_matches(method, dtype, served):
    if method not in EXPORTS[dtype]:
        pytest.skip(f"{dtype} rows are the same storage for every method: checked on {FEW}")
    reference, outputs, reports, _ = served
    row = EXPORTS[dtype].index(method)
    for (eager, trained), program in zip(reference[dtype], outputs[dtype]):
        assert program is not None, "every method's program serves a batch of 1 (min_batch 1)"
        assert program.shape == eager.shape
        torch.testing.assert_close(program[row], eager[row], atol=TOLERANCE, rtol=TOLERANCE)
        if dtype == "fp32":  # fp32 export predicts exactly as the trained model
            torch.testing.assert_close(program[row], trained[row], atol=TOLERANCE, rtol=TOLERANCE)
    assert "outside its table's range" in outputs[dtype + ":bad"]
    module = reports[dtype].modules[f"models.{row}.embedding"]
    assert module["method"] == method
    assert module["bytes"] <= module["bytes_fp32"]


def test_pt2_metadata_and_errors(served, tmp_path):
    _, _, reports, folder = served
    extra = {E.PT2_METADATA: ""}
    torch.export.load(folder / "int8.pt2", extra_files=extra)
    meta = json.loads(extra[E.PT2_METADATA])
    assert meta["min_batch"] == 1
    assert meta["format"] == E.PT2_FORMAT and meta["dtype"] == "int8"
    assert meta["inputs"] == ["arg0", "arg1.values", "arg1.lengths"]
    assert [m["method"] for m in meta["modules"]] == EXPORTS["int8"]
    assert reports["fp32"].file_bytes > reports["fp32"].table_bytes
    with pytest.raises(ValueError, match="example_inputs"):
        E.export(dlrm("full"), tmp_path / "x.pt2", format="pt2")
    with pytest.raises(ValueError, match="batch of at least 2"):
        E.export(dlrm("full"), tmp_path / "x.pt2", format="pt2", example_inputs=inputs(1))


class CTRZoo(nn.Module):
    """The other CTR models (not DLRM) over a few methods: ``(dense, kjt) -> [models x methods, B]``."""

    MODELS = ("dcn_v2", "deepfm", "wide_deep")

    def __init__(self, methods: list[str]) -> None:
        super().__init__()
        from ctr_models import build_model

        models = []
        for name in self.MODELS:
            for method in methods:
                torch.manual_seed(0)
                module = embtable.build(make_features(), CASES[method].config, CASES[method].budget, seed=0)
                models.append(build_model(name, module, NUM_DENSE))
        self.models = nn.ModuleList(models)

    def forward(self, dense: torch.Tensor, kjt) -> torch.Tensor:
        return torch.stack([model(dense, kjt) for model in self.models])


def test_compile_fullgraph_other_ctr_models():
    """dcn_v2, deepfm and wide_deep over hash and qr compile as ONE graph (fullgraph=True) and match eager.

    Dynamo's capture is what fullgraph checks; the ``eager`` backend skips the compiler (slow on CPU).
    """
    torch.set_num_threads(1)
    torch._dynamo.reset()
    model = CTRZoo([m for m in ("hash", "qr") if m in TRACEABLE]).eval()
    dense, kjt = inputs(4)
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(dense, kjt), model(dense, kjt))
