"""torch-compile* backends: bucketing never changes logits (mask included), no bucket falls back
to eager, warm-up compiles the named buckets, bad input is one error line. Tiny models only:
Inductor on 2 CPU cores takes ~30 s for the first graph and ~5-10 s for each further one."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_tiny_model
from theseus_deploy.cli import cli
from theseus_deploy.errors import UsageError
from theseus_deploy.runtime import CompiledRunner, TextClassifier, TorchRunner, random_inputs, load_runner
from theseus_deploy.hf import load_classifier


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    # 3 layers: an architecture no other test compiles, so graph counts below are this test's own
    return make_tiny_model(tmp_path_factory.mktemp("compile") / "bert3", "bert", 3)


def _feeds(runner, b, s, seed):
    return runner.encode(random_inputs(b, s, runner.vocab_size, runner.input_names, seed=seed, padded=True))


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_padding_to_a_bucket_keeps_logits(arch, tmp_path):
    """The padding itself, in eager mode (fast): right-padded rows (mask 0 beyond their length),
    padded up to a bucket in both axes, give the unpadded logits; RoBERTa checks position ids."""
    path = make_tiny_model(tmp_path / arch, arch, 2)
    runner = CompiledRunner(load_classifier(str(path)), "torch-compile", "cpu", seq_bucket=32)  # compiles lazily
    for b, s in ((3, 20), (1, 7), (5, 33)):
        feeds = _feeds(runner, b, s, seed=s)
        assert (feeds["attention_mask"] == 0).any() or b == 1
        bb, bs = runner.bucket(b, s)
        assert bb >= b and bb & (bb - 1) == 0 and bs % 32 == 0 and bs >= s
        padded = runner._pad(feeds, bb, bs)
        assert padded["attention_mask"].shape == (bb, bs) and int(padded["attention_mask"][:b, s:].sum()) == 0
        with torch.inference_mode():
            want = runner.model(**feeds).logits
            got = runner.model(**padded).logits[:b]
        assert torch.allclose(got, want, atol=1e-5), (arch, b, s, (got - want).abs().max())


@pytest.mark.slow
def test_compiled_buckets_match_eager_and_never_fall_back(tiny3):
    """Two buckets compiled under a recompile limit of 1 (dynamo's own would send the second to
    eager): both compile (graph count +2), a third shape reuses a bucket, logits match eager."""
    from torch._dynamo.utils import counters

    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch cannot restore dynamo's config)
        _two_buckets(tiny3, counters)


def _two_buckets(tiny3, counters):
    model = load_classifier(str(tiny3))
    eager = TorchRunner(load_classifier(str(tiny3)), "torch", "cpu")
    runner = CompiledRunner(model, "torch-compile", "cpu", seq_bucket=32)
    graphs = counters["stats"]["unique_graphs"]
    assert runner.warmup([(3, 20), (4, 32)]) == [(4, 32)]  # one bucket for both shapes
    for b, s, seed in ((3, 20, 1), (2, 17, 2), (1, 40, 3)):  # buckets 4x32, 2x32 (new, on first use), 1x64 ...
        if (b, s) == (1, 40):
            break  # a third bucket would add ~10 s; two show the point
        raw = random_inputs(b, s, eager.vocab_size, eager.input_names, seed=seed, padded=True)
        got, want = runner.logits(runner.encode(raw)), eager.logits(eager.encode(raw))
        assert got.shape == want.shape == (b, 2) and np.abs(got - want).max() < 1e-4
    assert runner.compiled_buckets == [(4, 32), (2, 32)]
    assert counters["stats"]["unique_graphs"] - graphs == 2  # each bucket a compiled graph, none eager


def test_bad_input_is_one_line(tiny_bert, tmp_path, monkeypatch):
    runner = CompiledRunner(load_classifier(str(tiny_bert)), "torch-compile", "cpu", seq_bucket=100)
    with pytest.raises(UsageError, match="sequence 510 pads to a bucket of 600, beyond the model's 514 positions"):
        runner.warmup([(1, 510)])
    assert runner.compiled_buckets == []
    with pytest.raises(UsageError, match="needs --device cuda"):
        load_runner(str(tiny_bert), "torch-compile-fp16", "cpu")
    monkeypatch.setattr("theseus_deploy.runtime.pytorch.cpu_has_bf16", lambda: False)
    with pytest.raises(UsageError, match="AVX512-BF16 or AMX"):
        load_runner(str(tiny_bert), "torch-compile-bf16", "cpu")
    out = tmp_path / "b"
    base = ["bench", "--model", str(tiny_bert), "--backend", "torch-compile", "--batch-sizes", "1", "--iterations", "1",
            "--rounds", "1", "--min-seconds", "0", "--output", str(out)]
    r = CliRunner().invoke(cli, base + ["--seq-lens", "510", "--seq-bucket", "100"])
    assert r.exit_code == 2 and "pads to a bucket of 600" in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()
    # no working C++ compiler for Inductor: refused before any model is loaded or file written
    for args in (base + ["--seq-lens", "16"],
                 ["export", "--model", str(tiny_bert), "--format", "torch-compile", "--output", str(out)]):
        with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
            r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and "needs a working C++ compiler" in r.output and "Traceback" not in r.output, r.output
        errors = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and not out.exists()


@pytest.mark.slow
def test_bench_export_and_text_classifier(tiny_bert, tmp_path):
    """bench compiles its shapes' buckets before timing; export validates torch-compile and writes
    no file; TextClassifier warms up explicitly and agrees with eager."""
    out = tmp_path / "b"
    r = CliRunner().invoke(cli, ["bench", "--model", str(tiny_bert), "--backend", "torch", "--backend", "torch-compile",
                                 "--batch-sizes", "2", "--seq-lens", "16", "--iterations", "2", "--rounds", "2",
                                 "--min-seconds", "0", "--warmup", "0", "--output", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    (key, info), = res["compiled"].items()
    assert key.endswith("|torch-compile") and info["buckets"] == [[2, 32]]
    assert {c["backend"] for c in res["cells"]} == {"torch", "torch-compile"}

    m = CliRunner().invoke(cli, ["export", "--model", str(tiny_bert), "--format", "torch-compile", "--output",
                                 str(tmp_path / "e"), "--max-seq-length", "16", "--max-batch-size", "2"])
    assert m.exit_code == 0, m.output
    art, = json.loads((tmp_path / "e" / "manifest.json").read_text())["artifacts"]
    assert art["format"] == "torch-compile" and art["file"] is None
    assert all(s["max_abs_diff"] <= 1e-4 for s in art["validation"]["shapes"])

    clf = TextClassifier.load(str(tiny_bert), backend="torch-compile")
    assert clf.warmup([(2, 16)]) == [(2, 32)]
    texts = ["a great movie", "a dull film that goes on and on"]
    got, want = clf(texts), TextClassifier.load(str(tiny_bert))(texts)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert np.allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5)
    assert clf.runner.compiled_buckets == [(2, 32)]  # the texts fit the warmed bucket: nothing new compiled


@pytest.mark.gpu
def test_cuda_graph_buckets_match_eager_on_gpu(tiny3):
    """CUDA: torch-compile-fp16 / -bf16 (CUDA graphs) agree with eager on padded inputs, for a
    warmed bucket and one compiled on first use; results of earlier calls stay valid."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    for backend, eager_backend, tol in (("torch-compile-fp16", "torch-fp16", 2e-2), ("torch-compile-bf16", "torch-bf16", 1e-1)):
        eager = load_runner(str(tiny3), eager_backend, "cuda")
        runner = load_runner(str(tiny3), backend, "cuda")
        assert runner.warmup([(3, 20)]) == [(4, 32)]
        kept = []
        shapes = ((3, 20, 1), (4, 32, 2), (1, 40, 3)) if backend.endswith("fp16") else ((3, 20, 1),)
        for b, s, seed in shapes:  # fp16's last: bucket 1x64, compiled on first use
            raw = random_inputs(b, s, eager.vocab_size, eager.input_names, seed=seed, padded=True)
            got, want = runner.logits(runner.encode(raw)), eager.logits(eager.encode(raw))
            assert got.shape == want.shape == (b, 2) and np.abs(got - want).max() < tol, (backend, b, s)
            kept.append((got, want))
        assert runner.compiled_buckets == ([(4, 32), (1, 64)] if backend.endswith("fp16") else [(4, 32)])
        assert all(np.abs(g - w).max() < tol for g, w in kept)
