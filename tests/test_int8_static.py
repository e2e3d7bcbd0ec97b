"""Static (calibrated) INT8: export, validation, manifest, loading, bench, and bad input."""
import json

import numpy as np
import pytest

from theseus_deploy.config import ExportConfig
from click.testing import CliRunner

from theseus_deploy.cli import cli
from theseus_deploy.errors import UsageError
from theseus_deploy.export.api import export_model
from theseus_deploy.runtime import TextClassifier, load_runner


@pytest.fixture(scope="module")
def static_export(tiny_bert, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "bert"
    m = export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx-int8-static"], output=str(out),
                                     max_seq_length=64, task="sst2", data_dir=str(glue_dir), max_eval_samples=64,
                                     calibration_samples=16))
    return out, m


def test_static_int8_builds_validates_and_records_calibration(static_export, glue_dir):
    out, m = static_export
    (art,) = m["artifacts"]
    assert art["format"] == "onnx-int8-static" and (out / "model-int8-static.onnx").is_file()
    assert not (out / "model.onnx").exists()  # the fp32 graph it came from is not kept
    ops = art["quantized_ops"]
    # every encoder MatMul got static activation scales (QDQ pairs), Attention dynamic QAttention
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"] // 2 and ops["QAttention"] == 4
    q = art["quantization"]
    assert (q["mode"], q["format"], q["attention"], q["per_channel"]) == ("static", "qdq", "dynamic", True)
    cal = q["calibration"]
    assert (cal["task"], cal["split"], cal["samples"], cal["seq_length"], cal["method"]) == ("sst2", "train", 16, 64, "minmax")
    assert len(cal["texts_sha256"]) == 64 and cal["source"].startswith(str(glue_dir))
    shapes = art["validation"]["shapes"]
    assert [tuple(s["shape"]) for s in shapes] == [(1, 16), (3, 37), (8, 64)]
    assert all(s["max_abs_diff"] <= s["tolerance"] for s in shapes)
    task = art["validation"]["task"]
    assert abs(task["delta_vs_pytorch"]) <= 0.01 + 1e-9  # passed the 1-point task check
    assert json.loads((out / "manifest.json").read_text())["artifacts"][0]["quantization"] == q


def test_static_int8_loads_and_agrees(static_export, tiny_bert):
    out, _ = static_export
    ref = load_runner(str(tiny_bert), "torch")
    want = ref.logits(ref.make_inputs(2, 20, seed=5))
    for session in ("default", "latency"):
        r = load_runner(str(out), "onnx-int8-static", session_config=session)
        got = r.logits(r.make_inputs(2, 20, seed=5))
        assert got.shape == want.shape and np.abs(got - want).max() < 0.5 * np.abs(want).max() + 1e-3
    clf = TextClassifier.load(str(out), backend="onnx-int8-static", session_config="latency")
    res = clf(["a great movie", "a dull one"])
    assert len(res) == 2 and 0.5 <= res[0]["score"] <= 1


def test_qoperator_and_custom_calibration_file(tiny_bert, tmp_path):
    rows = [{"text": f"{'a fine film ' * (i % 4 + 1)}number {i}"} for i in range(12)]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    m = export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx-int8", "onnx-int8-static"],
                                     output=str(tmp_path / "o"), max_seq_length=32, calibration_task="custom",
                                     calibration_file=str(tmp_path / "calib.jsonl"), calibration_text_columns="text",
                                     calibration_samples=100, int8_static_format="qoperator",
                                     int8_static_attention="fp32"))
    art = {a["format"]: a for a in m["artifacts"]}["onnx-int8-static"]
    assert art["quantized_ops"]["QLinearMatMul"] > 0 and art["quantized_ops"]["QAttention"] == 0
    assert art["quantized_ops"]["Attention"] == 4  # kept fp32 when asked
    cal = art["quantization"]["calibration"]
    assert (cal["task"], cal["samples"], cal["text_columns"]) == ("custom", 12, ["text"])  # all 12 of 100 asked
    assert all(s["max_abs_diff"] <= s["tolerance"] for s in art["validation"]["shapes"])


def test_calibration_changes_the_scales(tiny_bert, tmp_path):
    """Different calibration texts give different activation scales (the calibration is used)."""
    import onnx

    def scales(texts, name):
        (tmp_path / f"{name}.csv").write_text("t\n" + "\n".join(f'"{t}"' for t in texts) + "\n")  # CSV: quoted
        export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx-int8-static"], output=str(tmp_path / name),
                                     max_seq_length=32, validate=False, calibration_task="custom",
                                     calibration_file=str(tmp_path / f"{name}.csv"), calibration_text_columns="t",
                                     calibration_samples=8))
        g = onnx.load(str(tmp_path / name / "model-int8-static.onnx")).graph
        return {i.name: onnx.numpy_helper.to_array(i).tolist() for i in g.initializer if i.name.endswith("_scale")}

    a = scales(["a good movie"] * 4, "a")
    b = scales(["the worst , most tedious thing i have ever sat through"] * 4, "b")
    assert a.keys() == b.keys() and any(a[k] != b[k] for k in a)


@pytest.mark.parametrize("args,msg", [
    ([], "onnx-int8-static needs calibration texts"),
    (["--calibration-task", "sst2", "--calibration-samples", "0"], "--calibration-samples must be at least 1"),
    (["--calibration-task", "custom"], "--calibration-task custom needs --calibration-file"),
    (["--calibration-task", "custom", "--calibration-file", "missing.csv", "--calibration-text-columns", "t"],
     "data file does not exist"),
    (["--calibration-task", "sst2", "--int8-static-format", "int4"], "Invalid value for '--int8-static-format'"),
])
def test_bad_calibration_input(args, msg, tiny_bert, tmp_path):
    r = CliRunner().invoke(cli, ["export", "--model", str(tiny_bert), "--format", "onnx-int8-static", *args,
                                 "--output", str(tmp_path / "o")])
    assert r.exit_code == 2 and msg in r.output and r.output.count("error:") == 1, r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_calibration_flags_without_static_format(tiny_bert, tmp_path):
    with pytest.raises(UsageError, match="only apply to --format onnx-int8-static"):
        export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx-int8"], output=str(tmp_path / "o"),
                                     calibration_task="sst2"))
    assert not (tmp_path / "o").exists()


def test_bench_static_backend(tiny_bert, tmp_path):
    from conftest import make_tiny_model

    succ = make_tiny_model(tmp_path / "succ", "bert", 2)
    rows = ["text,label"] + [f"{'good ' * (i % 7 + 1)}movie,{i % 2}" for i in range(12)]
    (tmp_path / "dev.csv").write_text("\n".join(rows) + "\n")
    base = ["bench", "--model", str(tiny_bert), "--model", str(succ), "--backend", "onnx-int8",
            "--backend", "onnx-int8-static", "--batch-sizes", "1", "--seq-lens", "16", "--iterations", "2",
            "--rounds", "1", "--min-seconds", "0", "--warmup", "1"]
    bad = CliRunner().invoke(cli, [*base, "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "onnx-int8-static needs calibration texts" in bad.output
    assert not (tmp_path / "bad").exists()
    data = ["--task", "custom", "--train-file", str(tmp_path / "dev.csv"), "--validation-file", str(tmp_path / "dev.csv"),
            "--text-columns", "text", "--label-column", "label", "--traffic-batch-size", "4"]
    r = CliRunner().invoke(cli, [*base, *data, "--ort-session", "latency", "--output", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert {c["backend"] for c in res["cells"]} == {"onnx-int8", "onnx-int8-static"}
    assert res["config"]["ort_session"] == "latency" and res["config"]["calibration"]["calibration_task"] == "custom"


def test_fully_static_attention_has_no_dynamic_quantisation(tiny_bert, glue_dir, tmp_path):
    m = export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx-int8-static"], output=str(tmp_path / "o"),
                                     max_seq_length=64, task="sst2", data_dir=str(glue_dir), max_eval_samples=64,
                                     calibration_samples=16, int8_static_attention="static"))
    (art,) = m["artifacts"]
    ops = art["quantized_ops"]
    assert ops["QAttention"] == 4 and ops["DynamicQuantizeLinear"] == 0 and ops["QuantizeLinear"] > 0
    assert art["quantization"]["attention"] == "static"
    assert all(s["max_abs_diff"] <= s["tolerance"] for s in art["validation"]["shapes"])
    assert abs(art["validation"]["task"]["delta_vs_pytorch"]) <= 0.01 + 1e-9
