"""`export --format triton`: the model repository on a tiny model, checked offline; broken configs caught;
the Python-backend steps run against a stand-in for triton_python_backend_utils."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from theseus_deploy.config import ExportConfig

pytest.importorskip("tritonclient.grpc.model_config_pb2")

from theseus_deploy.export.triton import RepositoryError, validate_repository  # noqa: E402


@pytest.fixture(scope="module")
def repo(tiny_bert, tmp_path_factory):
    from theseus_deploy.export.triton import export_repository

    out = tmp_path_factory.mktemp("triton") / "repo"
    export_repository(ExportConfig.of(model=str(tiny_bert), output=str(out),
                                      formats=["triton", "onnx-int8", "onnx-fp16"], max_batch_size=16,
                                      triton_max_length=32, max_seq_length=128))
    return out


def parse(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_layout_and_configs(repo):
    m = json.loads((repo / "manifest.json").read_text())
    assert set(m["models"]) == {"text_classifier", "text_classifier_gpu", "text_classifier_tokenizer",
                                "text_classifier_onnx", "text_classifier_onnx_fp16", "text_classifier_postprocess"}
    assert m["export_manifest"]["artifacts"] and "README.md" in {p.name for p in repo.iterdir()}
    cpu, gpu = parse(repo / "text_classifier_onnx/config.pbtxt"), parse(repo / "text_classifier_onnx_fp16/config.pbtxt")
    assert cpu.platform == gpu.platform == "onnxruntime_onnx" and cpu.max_batch_size == 16
    assert cpu.instance_group[0].kind == cpu.instance_group[0].KIND_CPU
    assert gpu.instance_group[0].kind == gpu.instance_group[0].KIND_GPU
    assert gpu.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    db = cpu.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8, 16] and db.max_queue_delay_microseconds == 2000
    assert db.default_queue_policy.max_queue_size == 256 and db.default_queue_policy.default_timeout_microseconds > 0
    tok = parse(repo / "text_classifier_tokenizer/config.pbtxt")
    assert {o.name for o in tok.output} == {i.name for i in cpu.input} and all(list(o.dims) == [32] for o in tok.output)
    assert (repo / "text_classifier_onnx/1/model.onnx").is_file() and (repo / "text_classifier_onnx_fp16/1/model.onnx").is_file()
    ens = parse(repo / "text_classifier_gpu/config.pbtxt")
    assert [s.model_name for s in ens.ensemble_scheduling.step][1] == "text_classifier_onnx_fp16"
    assert len(validate_repository(repo)) >= 6


@pytest.mark.parametrize("breakage, message", [
    (("text_classifier_onnx", 'name: "input_ids"', 'name: "input_idz"'), "differ from the ONNX graph"),
    (("text_classifier_onnx", "TYPE_FP32", "TYPE_FP16"), "is TYPE_FP16, the graph has TYPE_FP32"),
    (("text_classifier_onnx", "max_batch_size: 16", "max_batch_size: 16\nmax_batch_sise: 3"), "does not parse"),
    (("text_classifier", '"text_classifier_postprocess"', '"text_classifier_post"'), "is not in the repository"),
    (("text_classifier", 'key: "logits"\n      value: "_logits"\n    }\n  }\n  step',
      'key: "logits"\n      value: "_logit"\n    }\n  }\n  step'), "produced by no"),
    (("text_classifier_tokenizer", "max_queue_size: 256", "max_queue_size: 0"), "unbounded"),
])
def test_broken_config_is_caught(repo, tmp_path, breakage, message):
    import shutil

    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    model, old, new = breakage
    cfg = broken / model / "config.pbtxt"
    text = cfg.read_text()
    assert old in text, text
    cfg.write_text(text.replace(old, new, 1))
    with pytest.raises(RepositoryError, match=message):
        validate_repository(broken)


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors, error


def _load_step(path):
    """Import a step's model.py with a stand-in for the module Triton's Python backend provides."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor, pb.InferenceResponse = _Tensor, _Response
    pb.TritonError = type("TritonError", (Exception,), {})
    pb.get_input_tensor_by_name = lambda request, name: next(t for t in request if t.name == name)
    sys.modules["triton_python_backend_utils"] = pb
    try:
        spec = importlib.util.spec_from_file_location(f"step_{path.parent.parent.name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["triton_python_backend_utils"]
    model = mod.TritonPythonModel()
    model.initialize({})
    return model


def test_python_steps_match_text_classifier(repo, tiny_bert):
    from theseus_deploy.runtime import TextClassifier
    from theseus_deploy.hf import load_tokenizer

    texts = ["a gripping film", "dull and far too long " * 20]
    tok_step = _load_step(repo / "text_classifier_tokenizer/1/model.py")
    good = [_Tensor("text", np.array([[t.encode()] for t in texts], dtype=object))]
    empty = [_Tensor("text", np.array([[b" "]], dtype=object))]
    r_good, r_empty = tok_step.execute([good, empty])
    assert r_empty.error is not None and "empty text" in str(r_empty.error)  # only that request fails
    feeds = {t.name: t.array for t in r_good.output_tensors}
    ref = load_tokenizer(str(tiny_bert))(texts, truncation=True, max_length=32, padding="max_length", return_tensors="np")
    for name, arr in feeds.items():
        assert arr.shape == (2, 32) and np.array_equal(arr, ref[name]), name
    clf = TextClassifier.load(str(tiny_bert), backend="torch", max_length=32)
    logits = clf.runner.logits(clf.runner.encode(feeds))
    post = _load_step(repo / "text_classifier_postprocess/1/model.py")
    (out,) = post.execute([[_Tensor("logits", logits)]])
    got = {t.name: t.array for t in out.output_tensors}
    for i, want in enumerate(clf(texts)):
        assert got["label"][i, 0].decode() == want["label"]
        assert abs(float(got["score"][i, 0]) - want["score"]) < 1e-5


def test_cli_export_triton_and_bad_format(tiny_bert, tmp_path, capsys):
    from theseus_deploy.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(tiny_bert), "--format", "triton", "--format", "torch-bf16",
              "--output", str(tmp_path / "bad")])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()
    assert capsys.readouterr().err.strip().startswith("error: --format triton packages")
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(tiny_bert), "--format", "triton", "--output", str(tmp_path / "repo"),
              "--max-seq-length", "64", "--triton-max-length", "32"])
    assert e.value.code == 0
    validate_repository(tmp_path / "repo")
    assert not (tmp_path / "repo" / "text_classifier_gpu").exists()


def test_repository_never_replaces_its_source_model(tiny_bert, tmp_path):
    """--output equal to (or a parent of) the model folder is refused even with --overwrite."""
    import shutil

    from click.testing import CliRunner

    from theseus_deploy.cli import cli

    model = tmp_path / "m"
    shutil.copytree(tiny_bert, model)
    before = sorted(p.name for p in model.iterdir())
    for out in (model, tmp_path):
        r = CliRunner().invoke(cli, ["export", "--model", str(model), "--format", "triton", "--output", str(out),
                                     "--overwrite"])
        assert r.exit_code == 2 and r.output.count("error:") == 1 and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.parametrize("damage", ["truncated", "not-onnx", "listed-config-json"])
def test_repository_from_an_export_folder_whose_artifact_is_not_onnx(tiny_bert, tmp_path, damage):
    """An export folder whose onnx-int8 file is not an ONNX graph (its sha256 in manifest.json matching, as
    after a hand edit): one `error:` line naming the file, exit 2, nothing written. It was onnx's
    DecodeError traceback (exit 1) from the repository check."""
    import hashlib
    import os
    import subprocess

    from conftest import REPO
    from theseus_deploy.export.api import export_model

    src = tmp_path / "exp"
    export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx-int8"], output=str(src), max_seq_length=32,
                                 max_batch_size=4))
    art = src / ("config.json" if damage == "listed-config-json" else "model-int8.onnx")  # .json: onnx's JSON reader
    data = art.read_bytes()
    if damage != "listed-config-json":
        art.write_bytes(data[: len(data) // 3] if damage == "truncated" else (src / "config.json").read_bytes())
    manifest = json.loads((src / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        if a["format"] == "onnx-int8":
            a["file"], a["sha256"] = art.name, hashlib.sha256(art.read_bytes()).hexdigest()
    (src / "manifest.json").write_text(json.dumps(manifest))
    r = subprocess.run([sys.executable, "-m", "theseus_deploy", "export", "--model", str(src), "--format", "triton",
                        "--output", str(tmp_path / "repo"), "--triton-max-length", "16", "--max-batch-size", "4"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: ") and f"{art}: not an ONNX graph" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_repository_check_failure_is_one_line(repo, tmp_path):
    """Several problems are one line (the CLI's `error:` line), each named."""
    import shutil

    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    cfg = broken / "text_classifier_onnx" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("TYPE_FP32", "TYPE_FP16").replace('name: "input_ids"', 'name: "input_idz"'))
    with pytest.raises(RepositoryError) as e:
        validate_repository(broken)
    assert "\n" not in str(e.value) and str(e.value).count("text_classifier_onnx/config.pbtxt") >= 2, str(e.value)
