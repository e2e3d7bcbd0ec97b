"""Export: every ONNX format on tiny BERT / RoBERTa / MPNet, fusion, validation, runners, errors."""
import json

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tiny import make_tiny_model
from theseus_deploy.config import ExportConfig
from theseus_deploy.data import load_task
from click.testing import CliRunner

from theseus_deploy.export.api import export_model
from theseus_deploy.runtime import TextClassifier, load_runner
from theseus_deploy.export.trt import Profile
from theseus_deploy.export.validate import ShapeMismatch, ValuesMismatch, validate
from theseus_deploy.cli import cli
from theseus_deploy.errors import UsageError


def _trt_and_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()

FORMATS = ["onnx", "onnx-int8", "onnx-fp16"]


@pytest.fixture(scope="module")
def bert_export(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "bert"
    manifest = export_model(ExportConfig.of(model=str(tiny_bert), formats=FORMATS + ["torch-bf16"], output=str(out),
                                            max_seq_length=128))
    return out, manifest


def test_bert_all_formats_fused_and_validated(bert_export, tiny_bert):
    out, manifest = bert_export
    arts = {a["format"]: a for a in manifest["artifacts"]}
    assert set(arts) == set(FORMATS + ["torch-bf16"])
    # tiny BERT has 4 layers: one fused Attention per layer, embeddings and layer norms fused
    for fmt in ("onnx", "onnx-fp16"):
        ops = arts[fmt]["fused_ops"]
        assert ops["Attention"] == 4 and ops["EmbedLayerNormalization"] == 1 and ops["SkipLayerNormalization"] == 8
        assert ops["BiasGelu"] + ops["FastGelu"] + ops["Gelu"] == 4
    assert arts["onnx-int8"]["quantized_ops"]["QAttention"] + arts["onnx-int8"]["quantized_ops"]["MatMulInteger"] > 0
    q = arts["onnx-int8"]["quantization"]
    # reduce_range follows the CPU the export ran on (theseus_deploy/cpu.py): 7-bit weights without VNNI/AMX
    from theseus_deploy.cpu import int8_dot_product

    assert q["reduce_range"] is (not int8_dot_product()) and q["reduce_range_chosen_by"].startswith("auto: ")
    assert {k: q[k] for k in ("mode", "weights", "per_channel")} == {"mode": "dynamic", "weights": "int8",
                                                                     "per_channel": True}
    for fmt, a in arts.items():
        shapes = [tuple(s["shape"]) for s in a["validation"]["shapes"]]
        assert shapes == [(1, 16), (3, 37), (8, 128)]
        assert all(s["max_abs_diff"] <= s["tolerance"] for s in a["validation"]["shapes"])
    assert max(s["max_abs_diff"] for s in arts["onnx"]["validation"]["shapes"]) < 1e-4
    for fmt in FORMATS:
        assert (out / arts[fmt]["file"]).stat().st_size == arts[fmt]["bytes"] and len(arts[fmt]["sha256"]) == 64
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["input_names"] == ["input_ids", "attention_mask", "token_type_ids"] and saved["opset"] == 17
    assert "onnxruntime" in saved["versions"] and (out / "tokenizer.json").is_file()


def test_dynamic_axes(bert_export):
    out, _ = bert_export
    g = onnx.load(str(out / "model.onnx")).graph
    for i in g.input:
        dims = i.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
    assert [o.name for o in g.output] == ["logits"]


@pytest.mark.parametrize("arch", ["roberta", "mpnet"])
def test_other_architectures(arch, tmp_path, request):
    src = request.getfixturevalue(f"tiny_{arch}")
    m = export_model(ExportConfig.of(model=str(src), formats=FORMATS, output=str(tmp_path / arch), max_seq_length=128))
    arts = {a["format"]: a for a in m["artifacts"]}
    assert m["input_names"] == ["input_ids", "attention_mask"]  # no segment embeddings
    assert max(s["max_abs_diff"] for s in arts["onnx"]["validation"]["shapes"]) < 1e-4
    if arch == "roberta":
        assert arts["onnx"]["fused_ops"]["Attention"] == 4
    else:  # MPNet's relative position bias keeps attention unfused; layer norms still fuse
        assert arts["onnx"]["fused_ops"]["SkipLayerNormalization"] > 0


def test_runners_agree_with_pytorch(bert_export, tiny_bert):
    out, _ = bert_export
    ref = load_runner(str(tiny_bert), "torch")
    feeds = ref.make_inputs(2, 20, seed=5)
    want = ref.logits(feeds)
    for backend in FORMATS:
        r = load_runner(str(out), backend)
        got = r.logits(r.make_inputs(2, 20, seed=5))
        assert got.shape == want.shape and np.abs(got - want).max() < (1e-4 if backend == "onnx" else 5e-3)
    clf = TextClassifier.load(str(out), backend="onnx-int8")
    res = clf(["a great movie", "a dull one"])
    assert len(res) == 2 and {r["label"] for r in res} <= {"LABEL_0", "LABEL_1"} and 0.5 <= res[0]["score"] <= 1


def test_validation_catches_a_perturbed_graph(bert_export, tiny_bert, tmp_path):
    out, _ = bert_export
    model = onnx.load(str(out / "model.onnx"))
    init = next(i for i in model.graph.initializer if "classifier" in i.name and len(i.dims) == 2)
    arr = onnx.numpy_helper.to_array(init).copy()
    arr += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    ref = load_runner(str(tiny_bert), "torch")
    bad = load_runner(str(tiny_bert), "onnx", artifact=str(tmp_path / "bad.onnx"))
    with pytest.raises(ValuesMismatch, match=r"output 'logits' at input 1x16: max abs diff"):
        validate(ref, bad, "onnx", [(1, 16)])

    class WrongShape:
        input_names, vocab_size = ref.input_names, ref.vocab_size

        def encode(self, raw):
            return raw

        def logits(self, feeds):
            return np.zeros((1, 3), dtype=np.float32)

    with pytest.raises(ShapeMismatch, match="shape"):
        validate(ref, WrongShape(), "onnx", [(1, 16)])


def test_profile_from_flags():
    p = Profile.from_flags(32, 256)
    assert p.as_dict() == {"min": [1, 1], "opt": [16, 128], "max": [32, 256]}
    assert Profile.from_flags(8, 128, 4, 64).opt == (4, 64)
    with pytest.raises(UsageError, match="opt shape"):
        Profile.from_flags(8, 128, 16, 64)


def test_cli_export_and_bad_input(tiny_bert, tmp_path):
    ok = CliRunner().invoke(cli, ["export", "--model", str(tiny_bert), "--format", "onnx", "--output", str(tmp_path / "o"),
                                  "--max-seq-length", "64"])
    assert ok.exit_code == 0, ok.output
    assert "model.onnx" in ok.output and (tmp_path / "o" / "model.onnx").is_file()
    cases = [
        (["--model", str(tmp_path / "missing"), "--format", "onnx"], "model path does not exist"),
        (["--model", str(tiny_bert), "--format", "onnx-int4"], "Invalid value for '--format'"),
        (["--model", str(tiny_bert), "--format", "onnx", "--opset", "13"], "--opset must be at least 17"),
    ]
    if not _trt_and_gpu():  # where both are present, trt export is expected to work
        cases.append((["--model", str(tiny_bert), "--format", "onnx", "--format", "trt"], "TensorRT"))
    for args, msg in cases:
        r = CliRunner().invoke(cli, ["export", *args, "--output", str(tmp_path / "bad")])
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
        assert "Traceback" not in r.output
        assert not (tmp_path / "bad").exists()


def test_trt_absent_message(tiny_bert, tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(UsageError, match=r"needs TensorRT, which is not installed: install the extra with `pip install -e \.\[trt\]`"):
        export_model(ExportConfig.of(model=str(tiny_bert), formats=["trt"], output=str(tmp_path / "t")))
    assert not (tmp_path / "t").exists()


@pytest.mark.trt
@pytest.mark.gpu
def test_trt_engine_builds_and_matches(tiny_bert, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    m = export_model(ExportConfig.of(model=str(tiny_bert), formats=["trt"], output=str(tmp_path / "t"),
                                     max_batch_size=8, max_seq_length=128))
    art = m["artifacts"][0]
    assert art["format"] == "trt" and art["profile"]["max"] == [8, 128]
    assert all(s["max_abs_diff"] <= s["tolerance"] for s in art["validation"]["shapes"])


def test_task_level_check(tiny_bert, tmp_path, glue_dir):
    from theseus_deploy.export.validate import TaskMetricDrop, check_task_drop

    check_task_drop("onnx-int8", 0.905, 0.91)  # half a point: allowed
    with pytest.raises(TaskMetricDrop, match=r"onnx-int8: dev score 0.8900 is 0.0200 below PyTorch's 0.9100"):
        check_task_drop("onnx-int8", 0.89, 0.91)
    m = export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx-int8"], output=str(tmp_path / "t"),
                                     max_seq_length=64, task="sst2", data_dir=str(glue_dir), max_eval_samples=64))
    assert m["task"]["pytorch"]["score"] > 0 and "delta_vs_pytorch" in m["artifacts"][0]["validation"]["task"]
    assert [a["format"] for a in m["artifacts"]] == ["onnx-int8"]  # the fp32 graph it was built from is not kept
    assert not (tmp_path / "t" / "model.onnx").exists()


def test_task_check_records_loyalty(tiny_bert, tmp_path, glue_dir):
    """With --task each artifact's loyalty to its PyTorch model is in the manifest: the fp32 graph
    decides like PyTorch on every row (label loyalty exactly 1), and its distributions all but equal."""
    m = export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx"], output=str(tmp_path / "t"),
                                     max_seq_length=64, task="sst2", data_dir=str(glue_dir), max_eval_samples=64))
    loy = m["artifacts"][0]["validation"]["task"]["loyalty"]
    assert loy["label"] == 1.0 and 0.9999 < loy["probability"] <= 1.0
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["artifacts"][0]["validation"]["task"]["loyalty"] == loy


def test_min_loyalty_refuses_an_artifact_and_writes_nothing(tmp_path, glue_dir):
    """Regression: loyalty is the Pearson correlation of the two predictions. INT8 is never exact (on
    the tiny random model, whose predictions barely vary across rows, its noise even dominates them);
    the same export with --min-loyalty above the recorded value is refused: one line, exit 2, no
    folder; at the recorded value it passes."""
    model = make_tiny_model(tmp_path / "reg", "bert", 2, num_labels=1)
    flags = ["--model", str(model), "--format", "onnx-int8", "--max-seq-length", "64", "--task", "stsb",
             "--data-dir", str(glue_dir), "--max-eval-samples", "48"]
    r = CliRunner().invoke(cli, ["export", *flags, "--output", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output
    loy = json.loads((tmp_path / "ok" / "manifest.json").read_text())["artifacts"][0]["validation"]["task"]["loyalty"]
    pearson = loy["pearson"]
    assert set(loy) == {"pearson"} and -1.0 <= pearson < 1.0 and "loyalty prediction Pearson" in r.output
    limit = f"{min(1.0, max(pearson, 0.0) + 0.01):.6f}"
    r = CliRunner().invoke(cli, ["export", *flags, "--output", str(tmp_path / "no"), "--min-loyalty", limit])
    assert r.exit_code == 2, r.output
    assert f"onnx-int8: prediction Pearson to PyTorch on dev {pearson:.4f} < --min-loyalty" in r.output
    assert not (tmp_path / "no").exists()
    r = CliRunner().invoke(cli, ["export", *flags, "--output", str(tmp_path / "at"),
                                 "--min-loyalty", f"{max(0.0, pearson - 1e-6):.6f}"])
    assert r.exit_code == 0, r.output


def test_min_loyalty_on_a_classifier_compares_label_loyalty(tmp_path, glue_dir):
    """Classification: the limit compares label loyalty, the share of dev rows where the artifact
    and PyTorch pick the same label. A tiny random model's margins barely vary across rows (about
    4e-5 here); its head's bias moved to their median puts every row on the edge of a tie, so INT8's
    noise flips many of them (about half here), never all; above the recorded share the export is
    refused (one error line, exit 2, no folder), at it, it passes."""
    src = make_tiny_model(tmp_path / "m", "bert", 2)
    model, tok = AutoModelForSequenceClassification.from_pretrained(src).eval(), AutoTokenizer.from_pretrained(src)
    data = load_task("sst2", str(glue_dir), "dev", max_samples=48)
    with torch.no_grad():
        z = model(**tok([t[0] for t in data.texts], truncation=True, max_length=64, padding=True,
                        return_tensors="pt")).logits
        model.classifier.bias[1] -= float((z[:, 1] - z[:, 0]).median())
    model.save_pretrained(tmp_path / "tie")
    tok.save_pretrained(tmp_path / "tie")
    flags = ["--model", str(tmp_path / "tie"), "--format", "onnx-int8", "--max-seq-length", "64", "--task", "sst2",
             "--data-dir", str(glue_dir), "--max-eval-samples", "48", "--max-task-drop", "1"]
    r = CliRunner().invoke(cli, ["export", *flags, "--output", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output
    loy = json.loads((tmp_path / "ok" / "manifest.json").read_text())["artifacts"][0]["validation"]["task"]["loyalty"]
    assert set(loy) == {"label", "probability"} and 0 < loy["label"] < 1, loy
    r = CliRunner().invoke(cli, ["export", *flags, "--output", str(tmp_path / "no"), "--min-loyalty",
                                 repr(loy["label"] + 0.5 / 48)])
    assert r.exit_code == 2, r.output
    want = (f"error: validation failed, nothing written: onnx-int8: label loyalty to PyTorch on dev "
            f"{loy['label']:.4f} < --min-loyalty {loy['label'] + 0.5 / 48:g}")
    assert [x for x in r.output.splitlines() if x.startswith("error:")] == [want]
    assert not (tmp_path / "no").exists()
    r = CliRunner().invoke(cli, ["export", *flags, "--output", str(tmp_path / "at"), "--min-loyalty", repr(loy["label"])])
    assert r.exit_code == 0, r.output


def test_validation_inputs_are_padded_like_real_batches():
    from theseus_deploy.runtime import random_inputs

    raw = random_inputs(8, 32, 1000, ["input_ids", "attention_mask"], seed=3, padded=True)
    lengths = raw["attention_mask"].sum(1)
    assert lengths[0] == 32 and lengths.min() < 32  # row 0 full, others right-padded
    assert ((raw["input_ids"] == 0) == (raw["attention_mask"] == 0)).all()


def test_plain_fp16_graph_for_tensorrt(tiny_bert, tmp_path):
    """TensorRT's parser knows only standard ONNX ops: its fp16 graph must carry no ORT fusions."""
    m = export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx-fp16-trt"], output=str(tmp_path / "t"),
                                     max_seq_length=128))
    art = m["artifacts"][0]
    assert art["file"] == "model-fp16-trt.onnx" and art["ops"]["standard_ops_only"]
    graph = onnx.load(str(tmp_path / "t" / "model-fp16-trt.onnx")).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    assert not {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"} & {n.op_type for n in graph.node}
    fp16 = onnx.TensorProto.FLOAT16
    assert any(i.data_type == fp16 for i in graph.initializer)  # weights are fp16 ...
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # ... logits stay fp32
    assert all(s["max_abs_diff"] <= s["tolerance"] for s in art["validation"]["shapes"])


@pytest.mark.gpu
def test_ort_cuda_runner_matches_cpu(bert_export):
    """IOBinding path: device-resident inputs and outputs give the CPU session's logits."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with the CUDA execution provider is not installed")
    out, _ = bert_export
    cpu = load_runner(str(out), "onnx", "cpu")
    gpu = load_runner(str(out), "onnx", "cuda")
    for b, s in ((1, 16), (4, 64)):
        raw = {n: np.asarray(v) for n, v in cpu.make_inputs(b, s, seed=b).items()}
        assert np.abs(gpu.logits(gpu.encode(raw)) - cpu.logits(cpu.encode(raw))).max() < 1e-3
    clf = TextClassifier.load(str(out), backend="onnx-fp16", device="cuda")
    assert len(clf(["a great movie", "a dull film"])) == 2


def _fusion_off(monkeypatch):
    """Stand-in for onnxruntime < 1.31 (whose patterns miss transformers 5's attention): the same
    fusion pass with attention and embedding fusion switched off."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    real = optimizer.optimize_model

    def unfused(*args, **kwargs):
        opts = FusionOptions("bert")
        opts.enable_attention = opts.enable_embed_layer_norm = False
        return real(*args, optimization_options=opts, **kwargs)

    monkeypatch.setattr(optimizer, "optimize_model", unfused)


def test_unfused_attention_fails_with_one_line_naming_onnxruntime(tiny_bert, tmp_path, monkeypatch):
    import onnxruntime

    _fusion_off(monkeypatch)
    out = tmp_path / "unfused"
    r = CliRunner().invoke(cli, ["export", "--model", str(tiny_bert), "--format", "onnx", "--output", str(out),
                                 "--no-validate"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    errors = [x for x in r.output.splitlines() if "error" in x.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), r.output
    line = errors[0]
    assert f"onnxruntime {onnxruntime.__version__}" in line and "0 Attention for 4 layers" in line
    assert "no EmbedLayerNormalization" in line and "--allow-unfused" in line
    assert not out.exists()
    # the flag keeps the unfused graph, and the manifest says what was (not) fused
    m = export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx"], output=str(out), validate=False,
                                     allow_unfused=True))
    ops = m["artifacts"][0]["fused_ops"]
    assert ops["Attention"] == 0 and ops["EmbedLayerNormalization"] == 0 and (out / "model.onnx").is_file()


def test_check_fusion_counts():
    from theseus_deploy.export.onnx import check_fusion

    bert = {"model_type": "bert", "num_layers": 4}
    check_fusion({"Attention": 4, "EmbedLayerNormalization": 1}, bert)
    with pytest.raises(UsageError, match="3 Attention for 4 layers"):
        check_fusion({"Attention": 3, "EmbedLayerNormalization": 1}, bert)
    with pytest.raises(UsageError, match="no EmbedLayerNormalization"):
        check_fusion({"Attention": 4}, bert)
    check_fusion({"Attention": 4}, {"model_type": "roberta", "num_layers": 4})  # RoBERTa keeps its embeddings
    check_fusion({}, {"model_type": "mpnet", "num_layers": 4})  # relative attention bias: never fused


def test_task_f1_scores_the_positive_class_of_a_model_with_another_label_order(tmp_path, synthetic_glue):
    """MRPC's F1 is that of `equivalent`. A model that calls `equivalent` id 0 (the data: id 1) had
    its dev labels remapped but F1 scored on id 1, i.e. `not_equivalent`: export recorded f1 0.0
    where evaluate gave 0.667 for the same model and rows. Now both score the same class."""
    from tiny import make_tiny_model
    from theseus_deploy.config import EvaluateConfig
    from theseus_deploy.recipes.evaluate import run_evaluate

    model = str(make_tiny_model(tmp_path / "m", "bert", 2, seed=3, labels=("equivalent", "not_equivalent")))
    ev = run_evaluate(EvaluateConfig.of(model=model, task="mrpc", data_dir=str(synthetic_glue), max_seq_length=32))
    assert ev["metrics"]["f1"] > 0  # this model's F1 of `not_equivalent` (what was scored) is 0.0
    m = export_model(ExportConfig.of(model=model, formats=["onnx"], output=str(tmp_path / "x"), max_seq_length=32,
                                     task="mrpc", data_dir=str(synthetic_glue)))
    assert m["task"]["pytorch"]["f1"] == pytest.approx(ev["metrics"]["f1"])
    assert m["artifacts"][0]["validation"]["task"]["f1"] == pytest.approx(ev["metrics"]["f1"])
