"""A backend is one registry entry plus its runner: `onnx-parallel` (theseus_deploy/runtime/ort_parallel.py)
works through TextClassifier, load_runner and bench, and no other module names it."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO
from theseus_deploy.cli import cli
from theseus_deploy.config import ExportConfig
from theseus_deploy.registry import BACKENDS
from theseus_deploy.runtime import TextClassifier, load_runner


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory):
    from theseus_deploy.export.api import export_model

    out = tmp_path_factory.mktemp("backends") / "e"
    export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx"], output=str(out), max_seq_length=64))
    return out


def test_parallel_backend_runs_the_shipped_graph_like_onnx(exported):
    import onnxruntime as ort

    par, seq = load_runner(str(exported), "onnx-parallel"), load_runner(str(exported), "onnx")
    opts = par.session.get_session_options()
    assert opts.execution_mode == ort.ExecutionMode.ORT_PARALLEL and opts.inter_op_num_threads == 2
    assert seq.session.get_session_options().execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    feeds = par.make_inputs(3, 24, seed=1)
    np.testing.assert_allclose(par.logits(feeds), seq.logits(seq.encode(feeds)), atol=1e-5)
    texts = ["a great movie", "a dull and boring film with a plot"]
    a = TextClassifier.load(str(exported), backend="onnx-parallel")(texts)
    b = TextClassifier.load(str(exported), backend="onnx")(texts)
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert np.allclose([x["score"] for x in a], [x["score"] for x in b], atol=1e-5)


def test_parallel_backend_through_bench(exported, tmp_path):
    args = ["--batch-sizes", "1", "--seq-lens", "16", "--iterations", "2", "--rounds", "1", "--min-seconds", "0"]
    r = CliRunner().invoke(cli, ["bench", "--model", str(exported), "--backend", "onnx", "--backend", "onnx-parallel",
                                 *args, "--output", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [c["backend"] for c in res["cells"]] == ["onnx", "onnx-parallel"]
    manifest = json.loads((exported / "manifest.json").read_text())
    assert {a["sha256"] for a in res["artifacts"]} == {manifest["artifacts"][0]["sha256"]}
    r = CliRunner().invoke(cli, ["bench", "--model", str(exported), "--backend", "onnx-parallel", "--device", "cuda",
                                 *args, "--output", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "needs --device cpu" in r.output


def test_the_new_backend_is_named_only_by_its_entry_and_its_runner():
    assert BACKENDS["onnx-parallel"].runner == "theseus_deploy.runtime.ort_parallel:OrtParallelRunner"
    naming = sorted(str(p.relative_to(REPO)) for p in (REPO / "theseus_deploy").rglob("*.py")
                    if "onnx-parallel" in p.read_text())
    assert naming == ["theseus_deploy/registry.py", "theseus_deploy/runtime/ort_parallel.py"]
