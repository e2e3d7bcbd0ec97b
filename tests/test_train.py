"""Recipes end to end on tiny models: the CLI, learning, freezing, resume, bad input."""
import json
import random

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForSequenceClassification

from conftest import make_tiny_model
from theseus_deploy.cli import cli
from theseus_deploy.config import CompressConfig
from theseus_deploy.train import CompressRecipe

WORDS = "the a movie film plot actor scene story music ending time people way thing day".split()


def write_toy(path, n, seed):
    """A keyword task a tiny model learns in a minute: label 1 iff 'great' occurs."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(4, 10))
        label = i % 2
        if label:
            words.insert(rng.randrange(len(words) + 1), "great")
        lines.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return ["--task", "custom", "--train-file", write_toy(d / "train.csv", 512, 0),
            "--validation-file", write_toy(d / "dev.csv", 128, 1), "--text-columns", "text", "--label-column", "label"]


def run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def predecessor(tmp_path_factory, toy):
    base = make_tiny_model(tmp_path_factory.mktemp("m") / "base", "bert", 4)
    out = tmp_path_factory.mktemp("ft") / "pred"
    r = run(["finetune", "--model", str(base), *toy, "--output", str(out), "--lr", "1e-3",
             "--max-steps", "120", "--eval-steps", "40", "--batch-size", "16", "--max-seq-length", "16"])
    assert r.exit_code == 0, r.output
    return out


def test_finetune_learns_and_writes_a_model_folder(predecessor):
    metrics = json.loads((predecessor / "metrics.json").read_text())
    assert metrics["dev"]["accuracy"] >= 0.9
    cfg = json.loads((predecessor / "run_config.json").read_text())
    assert cfg["total_steps"] == 120 and cfg["lr"] == 1e-3 and cfg["command"] == "finetune"
    model = AutoModelForSequenceClassification.from_pretrained(predecessor)
    assert model.config.id2label == {0: "0", 1: "1"}


def test_compress_learns_and_loads(predecessor, toy, tmp_path):
    out = tmp_path / "succ"
    r = run(["compress", "--model", str(predecessor), *toy, "--output", str(out), "--lr", "1e-3",
             "--max-steps", "120", "--eval-steps", "40", "--batch-size", "16", "--max-seq-length", "16"])
    assert r.exit_code == 0, r.output
    assert "retention:" in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["successor_layers"] == 2 and m["predecessor_layers"] == 4
    assert m["dev"]["accuracy"] >= 0.85, m
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ps = [rec["p"] for rec in log if "loss" in rec]
    assert ps[0] < 1.0 and ps[-1] == 1.0 and ps == sorted(ps)  # curriculum reaches 1
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["steps_to_full"] == 60 and cfg["blocks"] == [[0, 1], [2, 3]]
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 2
    ev = run(["evaluate", "--model", str(out), *toy, "--json", "--max-seq-length", "16"])
    assert ev.exit_code == 0
    result = json.loads(ev.output[ev.output.index("{"):])
    assert result["metrics"]["accuracy"] == pytest.approx(m["dev"]["accuracy"])


def _cfg(predecessor, toy, out, **kw):
    args = dict(zip([a.lstrip("-").replace("-", "_") for a in toy[::2]], toy[1::2]))
    base = dict(model=str(predecessor), output=str(out), lr=1e-3, max_steps=8, eval_steps=4,
                batch_size=16, max_seq_length=16, log_steps=1)
    base.update(kw)
    return CompressConfig(**args, **base)


def test_frozen_parameters_bit_identical(predecessor, toy, tmp_path):
    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o")).setup()
    before = {k: v.clone() for k, v in r.theseus.model.state_dict().items()}
    r.train()
    after = r.theseus.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".successor." in k for k in changed)
    frozen = [k for k in before if ".successor." not in k]
    assert all(torch.equal(before[k], after[k]) for k in frozen)


def test_all_predecessor_batches_train_nothing_but_advance(predecessor, toy, tmp_path):
    # constant p = 0 for 6 steps: every draw picks the predecessor, nothing to backpropagate
    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", scheduler="constant", replacing_rate=0.0,
                            steps_to_full=6, max_steps=6)).setup()
    before = [p.clone() for p in r.theseus.successor_parameters()]
    r.train()
    logs = [h for h in r.history if "loss" in h]
    assert r.step == 6 and logs[-1]["skipped_batches"] == 6 and logs[-1]["loss"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, r.theseus.successor_parameters()))
    assert r.lr_schedule.last_epoch == 6


def test_resume_equals_uninterrupted(predecessor, toy, tmp_path):
    full = CompressRecipe(_cfg(predecessor, toy, tmp_path / "a")).setup().train()
    part = CompressRecipe(_cfg(predecessor, toy, tmp_path / "b"))
    part.interrupt_at = 3
    part.setup().train()
    assert (tmp_path / "b.partial" / "checkpoint.pt").is_file() and not (tmp_path / "b").exists()
    resumed = CompressRecipe(_cfg(predecessor, toy, tmp_path / "b", resume=True)).setup()
    assert resumed.step == 3
    resumed.train()
    a, b = full.theseus.successor_state_dict(), resumed.theseus.successor_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h.get("p") for h in full.history] == [h.get("p") for h in resumed.history]
    resumed.save()
    assert (tmp_path / "b" / "model.safetensors").is_file() and not (tmp_path / "b.partial").exists()


def test_unfreeze_head_trains_head_after_p1(predecessor, toy, tmp_path):
    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", unfreeze_head=True, steps_to_full=2, max_steps=4)).setup()
    head = [p.clone() for p in r.theseus.head_parameters()]
    r.train()
    assert r.head_unfrozen
    assert any(not torch.equal(a, b) for a, b in zip(head, r.theseus.head_parameters()))


BAD = [
    (["compress", "--model", "./no/such/model", "--task", "sst2", "--output", "{out}"], "model path does not exist"),
    (["compress", "--model", "{pred}", "--task", "sst3", "--output", "{out}"], "unknown task 'sst3'"),
    (["compress", "--model", "{pred}", "--task", "sst2", "--data-dir", "{tmp}/nodata", "--output", "{out}"],
     "data folder does not exist"),
    (["compress", "--model", "{pred}", "--task", "custom", "--train-file", "{tmp}/none.csv", "--validation-file",
      "{tmp}/none.csv", "--text-columns", "text", "--label-column", "label", "--output", "{out}"], "does not exist"),
    (["compress", "--model", "{pred}", "{toy}", "--successor-layers", "9", "--output", "{out}"], "between 1 and"),
    (["compress", "--model", "{pred}", "{toy}", "--successor-layers", "0", "--output", "{out}"], "at least 1"),
    (["compress", "--model", "{pred}", "--task", "stsb", "--data-dir", "{glue}", "--output", "{out}"],
     "regression task but the model has 2"),
    (["evaluate", "--model", "{pred}", "--task", "custom", "--train-file", "{tmp}/empty.csv", "--validation-file",
      "{tmp}/empty.csv", "--text-columns", "text", "--label-column", "label"], "no examples"),
    (["finetune", "--model", "{pred}", "{toy}", "--text-columns", "txt", "--output", "{out}"], "column 'txt' not in"),
    (["compress", "--model", "{pred}", "{toy}", "--output", "{out}", "--resume"], "no checkpoint"),
    (["compress", "--model", "{pred}", "{toy}", "--output", "{out}", "--log-steps", "0"], "--log-steps must be at least 1"),
    (["finetune", "--model", "{pred}", "{toy}", "--output", "{out}", "--eval-steps", "0"], "--eval-steps must be at least 1"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[b[1] for b in BAD])
def test_bad_input_one_line_exit_2_nothing_written(args, msg, predecessor, toy, tmp_path):
    (tmp_path / "empty.csv").write_text("text,label\n")
    from conftest import GLUE_DIR

    if "{glue}" in args and not (GLUE_DIR / "STS-B").is_dir():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    fmt = {"pred": str(predecessor), "out": str(tmp_path / "out"), "tmp": str(tmp_path), "glue": str(GLUE_DIR)}
    argv = []
    for a in args:
        argv += toy if a == "{toy}" else [a.format(**fmt)]
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip().splitlines() if r.stderr else r.output.strip().splitlines()
    assert err[-1].startswith("error: ") and msg in err[-1], r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_output_not_empty_needs_overwrite(predecessor, toy, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    r = CliRunner().invoke(cli, ["compress", "--model", str(predecessor), *toy, "--output", str(tmp_path / "out")])
    assert r.exit_code == 2 and "not empty" in r.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_help_is_light():
    import subprocess
    import sys

    code = "import sys; from theseus_deploy.cli import cli; cli.main(['--help'], standalone_mode=False); " \
           "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "compress" in out.stdout and "finetune" in out.stdout


def test_truncation_baseline(predecessor, toy, tmp_path):
    out = tmp_path / "trunc"
    r = run(["finetune", "--model", str(predecessor), *toy, "--keep-layers", "2", "--output", str(out),
             "--max-steps", "4", "--batch-size", "16", "--max-seq-length", "16"])
    assert r.exit_code == 0, r.output
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_hidden_layers == 2
    bad = CliRunner().invoke(cli, ["finetune", "--model", str(predecessor), *toy, "--keep-layers", "9",
                                   "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--keep-layers must be between 1 and" in bad.output
    assert not (tmp_path / "bad").exists()


def test_failed_run_creates_no_parent_folders(predecessor, toy, tmp_path):
    r = CliRunner().invoke(cli, ["compress", "--model", str(predecessor), *toy, "--successor-layers", "9",
                                 "--output", str(tmp_path / "new" / "deeper" / "out")])
    assert r.exit_code == 2 and not (tmp_path / "new").exists()


def test_resume_refuses_a_different_run(predecessor, toy, tmp_path):
    part = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o"))
    part.interrupt_at = 2
    part.setup().train()
    from theseus_deploy.errors import UsageError

    with pytest.raises(UsageError, match=r"--resume with settings that differ .*--max-steps 8 -> 10"):
        CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", resume=True, max_steps=10)).setup()


def test_evaluate_custom_takes_labels_from_the_model(predecessor, toy):
    args = dict(zip(toy[::2], toy[1::2]))
    r = run(["evaluate", "--model", str(predecessor), "--task", "custom", "--validation-file", args["--validation-file"],
             "--text-columns", "text", "--label-column", "label", "--json", "--max-seq-length", "16"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    assert result["num_examples"] == 128 and result["metrics"]["accuracy"] >= 0.9


def test_finetune_regression_head_from_a_bare_encoder(tmp_path):
    """A regression task (STS-B style) on an encoder without a head: one output, regression loss."""
    base = make_tiny_model(tmp_path / "base", "bert", 2)
    rng = random.Random(0)
    rows = ["a,b,score"] + [f"{' '.join(rng.choices(WORDS, k=5))},{' '.join(rng.choices(WORDS, k=5))},{rng.uniform(0, 5):.2f}"
                            for _ in range(64)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    data = ["--task", "custom", "--train-file", str(tmp_path / "r.csv"), "--validation-file", str(tmp_path / "r.csv"),
            "--text-columns", "a,b", "--label-column", "score"]
    r = run(["finetune", "--model", str(base), *data, "--output", str(tmp_path / "o"), "--max-steps", "4",
             "--batch-size", "16", "--max-seq-length", "16"])
    assert r.exit_code == 0, r.output
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    assert {"pearson", "spearman"} <= set(json.loads((tmp_path / "o" / "metrics.json").read_text())["dev"])
