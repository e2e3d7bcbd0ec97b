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
from theseus_deploy.errors import UsageError
from theseus_deploy.recipes.compress import CompressRecipe

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


def _cfg(predecessor, toy, out, **kw):
    args = dict(zip([a.lstrip("-").replace("-", "_") for a in toy[::2]], toy[1::2]))
    base = dict(model=str(predecessor), output=str(out), lr=1e-3, max_steps=8, eval_steps=4,
                batch_size=16, max_seq_length=16, log_steps=1)
    base.update(kw)
    return CompressConfig(**args, **base)


@pytest.mark.parametrize("unfreeze_head", [False, True])  # the paper's frozen head; compress's default
def test_frozen_parameters_bit_identical(predecessor, toy, tmp_path, unfreeze_head):
    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", unfreeze_head=unfreeze_head)).setup()
    head = {k for k, p in r.theseus.model.state_dict(keep_vars=True).items()
            if any(p is h for h in r.theseus.head_parameters())}
    assert head  # pooler and classifier
    before = {k: v.clone() for k, v in r.theseus.model.state_dict().items()}
    r.train()
    after = r.theseus.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    learns = {k for k in before if ".successor." in k} | (head if unfreeze_head else set())
    assert changed and changed <= learns and (head <= changed) == unfreeze_head
    assert all(torch.equal(before[k], after[k]) for k in before if k not in learns)  # embeddings, predecessor


def test_all_predecessor_batches_train_nothing_but_advance(predecessor, toy, tmp_path):
    # constant p = 0 for 6 steps: every draw picks the predecessor, nothing to backpropagate
    # (a run must reach the successor-only phase: 7 steps, stopped as if killed after the 6th)
    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", scheduler="constant", replacing_rate=0.0,
                            steps_to_full=6, max_steps=7, eval_steps=7))
    r.cfg.stop_after_steps = 6
    r.setup()
    before = [p.clone() for p in r.theseus.successor_parameters()]
    r.train()
    logs = [h for h in r.history if "loss" in h]
    assert r.step == 6 and logs[-1]["skipped_batches"] == 6 and logs[-1]["loss"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, r.theseus.successor_parameters()))
    assert r.lr_schedule.last_epoch == 6


def test_resume_equals_uninterrupted(predecessor, toy, tmp_path):
    full = CompressRecipe(_cfg(predecessor, toy, tmp_path / "a")).setup().train()
    part = CompressRecipe(_cfg(predecessor, toy, tmp_path / "b"))
    part.cfg.stop_after_steps = 3
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
    (["finetune", "--model", "{pred}", "{toy}", "--output", "{out}", "--max-grad-norm", "-1"], "--max-grad-norm must be at least 0"),
    (["compress", "--model", "{pred}", "{toy}", "--output", "{out}", "--positive-label", "7"], "--positive-label '7' is not one"),
    (["compress", "--model", "{pred}", "{toy}", "--output", "{out}", "--max-steps", "8", "--steps-to-full", "9"],
     "the successor would never run alone"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[b[1] for b in BAD])
def test_bad_input_one_line_exit_2_nothing_written(args, msg, predecessor, toy, tmp_path, synthetic_glue):
    (tmp_path / "empty.csv").write_text("text,label\n")
    fmt = {"pred": str(predecessor), "out": str(tmp_path / "out"), "tmp": str(tmp_path), "glue": str(synthetic_glue)}
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


def test_cli_stop_after_steps_then_resume(predecessor, toy, tmp_path):
    """--stop-after-steps: a checkpoint and no output; --resume then finishes the run."""
    out = tmp_path / "o"
    args = ["compress", "--model", str(predecessor), *toy, "--output", str(out), "--max-steps", "6", "--eval-steps", "3"]
    r = CliRunner().invoke(cli, [*args, "--stop-after-steps", "2"])
    assert r.exit_code == 0, r.output
    assert "paused after step 2" in r.output and not out.exists()
    assert (tmp_path / "o.partial" / "checkpoint.pt").is_file()
    r = CliRunner().invoke(cli, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == 6 and not (tmp_path / "o.partial").exists()


def test_resume_refuses_a_different_run(predecessor, toy, tmp_path):
    part = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o"))
    part.cfg.stop_after_steps = 2
    part.setup().train()

    with pytest.raises(UsageError, match=r"--resume with settings that differ .*--max-steps 8 -> 10"):
        CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", resume=True, max_steps=10)).setup()


def test_evaluate_custom_takes_labels_from_the_model(predecessor, toy):
    args = dict(zip(toy[::2], toy[1::2]))
    r = run(["evaluate", "--model", str(predecessor), "--task", "custom", "--validation-file", args["--validation-file"],
             "--text-columns", "text", "--label-column", "label", "--json", "--max-seq-length", "16"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    assert result["num_examples"] == 128 and result["metrics"]["accuracy"] >= 0.9


def test_evaluate_output_file_holds_its_run_config(predecessor, toy, tmp_path):
    out = tmp_path / "ev.json"
    r = run(["evaluate", "--model", str(predecessor), *toy, "--max-seq-length", "16", "--output", str(out)])
    assert r.exit_code == 0, r.output
    saved = json.loads(out.read_text())
    assert saved["num_examples"] == 128 and "accuracy" in saved["metrics"]
    cfg = saved["run_config"]
    assert cfg["command"] == "evaluate" and cfg["model"] == str(predecessor) and cfg["max_seq_length"] == 16
    assert cfg["output"] == str(out)


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


# ====================================================================== training correctness
@pytest.fixture(scope="module")
def predecessor_top(tmp_path_factory, toy):
    """A predecessor whose embeddings and bottom 2 layers stayed random (--freeze-layers 2): the
    task is solved by layers 2-3, so a successor made of the bottom 2 layers starts at chance."""
    base = make_tiny_model(tmp_path_factory.mktemp("m") / "base", "bert", 4)
    out = tmp_path_factory.mktemp("ft") / "pred_top"
    r = run(["finetune", "--model", str(base), *toy, "--output", str(out), "--lr", "1e-3", "--freeze-layers", "2",
             "--max-steps", "120", "--eval-steps", "40", "--batch-size", "16", "--max-seq-length", "16"])
    assert r.exit_code == 0, r.output
    return out


def test_compress_learns_and_loads(predecessor_top, toy, tmp_path):
    from theseus_deploy.metrics import compute_metrics
    from theseus_deploy.recipes.common import predict

    untrained = CompressRecipe(_cfg(predecessor_top, toy, tmp_path / "u", max_steps=120)).setup()
    start = compute_metrics(untrained.spec, *predict(untrained.model, untrained.dev_loader, untrained.acc))["accuracy"]
    assert start <= 0.65, start  # the untrained successor (eval mode = successor only) is near chance
    out = tmp_path / "succ"
    r = run(["compress", "--model", str(predecessor_top), *toy, "--output", str(out), "--lr", "1e-3",
             "--max-steps", "120", "--eval-steps", "40", "--batch-size", "16", "--max-seq-length", "16"])
    assert r.exit_code == 0, r.output
    assert "retention:" in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["successor_layers"] == 2 and m["predecessor_layers"] == 4
    assert m["dev"]["accuracy"] >= max(0.75, start + 0.15), (start, m)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ps = [rec["p"] for rec in log if "loss" in rec]
    assert ps[0] < 1.0 and ps[-1] == 1.0 and ps == sorted(ps)  # curriculum reaches 1
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["steps_to_full"] == 30 and cfg["blocks"] == [[0, 1], [2, 3]]  # default: p = 1 at a quarter
    assert cfg["unfreeze_head"] is True
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 2
    ev = run(["evaluate", "--model", str(out), *toy, "--json", "--max-seq-length", "16"])
    assert ev.exit_code == 0
    result = json.loads(ev.output[ev.output.index("{"):])
    assert result["metrics"]["accuracy"] == pytest.approx(m["dev"]["accuracy"])


def _head_and_successor(r):
    return {**{f"s{i}": p.detach().clone() for i, p in enumerate(r.theseus.successor_parameters())},
            **{f"h{i}": p.detach().clone() for i, p in enumerate(r.theseus.head_parameters())}}


@pytest.mark.parametrize("interrupt", [2, 5])  # before / after the head starts learning (step 3)
def test_resume_with_unfreeze_head_equals_uninterrupted(predecessor, toy, tmp_path, interrupt):
    kw = dict(unfreeze_head=True, steps_to_full=3, max_steps=8, eval_steps=4)
    full = CompressRecipe(_cfg(predecessor, toy, tmp_path / "a", **kw)).setup()
    head0 = [p.detach().clone() for p in full.theseus.head_parameters()]
    full.train()
    assert full.head_unfrozen and any(not torch.equal(a, b) for a, b in zip(head0, full.theseus.head_parameters()))
    part = CompressRecipe(_cfg(predecessor, toy, tmp_path / "b", **kw))
    part.cfg.stop_after_steps = interrupt
    part.setup().train()
    resumed = CompressRecipe(_cfg(predecessor, toy, tmp_path / "b", resume=True, **kw)).setup()
    assert resumed.step == interrupt
    resumed.train()
    a, b = _head_and_successor(full), _head_and_successor(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h.get("loss") for h in full.history] == [h.get("loss") for h in resumed.history]


def test_head_frozen_until_successor_only_phase(predecessor, toy, tmp_path):
    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", unfreeze_head=True, steps_to_full=3, max_steps=5))
    r.cfg.stop_after_steps = 3
    r.setup()
    head = [p.detach().clone() for p in r.theseus.head_parameters()]
    r.train()  # steps 0-2: p < 1, head at LR 0 and without gradients
    assert all(torch.equal(a, b) for a, b in zip(head, r.theseus.head_parameters()))
    assert all(r.optimizer.state.get(p) in (None, {}) for p in r.theseus.head_parameters())  # no AdamW moments yet


def _embeddings(r):
    return [p.detach().clone() for p in r.theseus.embedding_parameters()]


def test_unfreeze_embeddings_trains_them_in_the_successor_only_phase_only(predecessor, toy, tmp_path):
    """--unfreeze-embeddings: the embeddings (shared by predecessor and successor) stay as loaded
    while p < 1 (at LR 0, no AdamW moments: the predecessor path is the loaded model), then learn
    with the successor; the saved successor has them, the predecessor layers never change."""
    kw = dict(unfreeze_head=True, unfreeze_embeddings=True, steps_to_full=3, max_steps=6, eval_steps=6)
    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", **kw))
    r.cfg.stop_after_steps = 3
    r.setup()
    emb0 = _embeddings(r)
    assert emb0 and all(p.requires_grad for p in r.theseus.embedding_parameters())
    pred0 = {k: v.clone() for k, v in r.theseus.model.state_dict().items() if ".predecessor." in k}
    r.train()
    assert all(torch.equal(a, b) for a, b in zip(emb0, r.theseus.embedding_parameters()))
    assert all(r.optimizer.state.get(p) in (None, {}) for p in r.theseus.embedding_parameters())
    full = CompressRecipe(_cfg(predecessor, toy, tmp_path / "f", **kw)).setup().train().save()
    assert any(not torch.equal(a, b) for a, b in zip(emb0, full.theseus.embedding_parameters()))
    assert all(torch.equal(v, full.theseus.model.state_dict()[k]) for k, v in pred0.items())
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "f")
    table = next(k for k in saved.state_dict() if k.endswith("word_embeddings.weight"))
    assert torch.equal(saved.state_dict()[table], full.theseus.successor_state_dict()[table])
    assert not torch.equal(saved.state_dict()[table],
                           AutoModelForSequenceClassification.from_pretrained(predecessor).state_dict()[table])
    assert json.loads((tmp_path / "f" / "run_config.json").read_text())["unfreeze_embeddings"] is True


@pytest.mark.parametrize("interrupt", [2, 5])  # before / after the embeddings start learning (step 3)
def test_resume_with_unfreeze_embeddings_equals_uninterrupted(predecessor, toy, tmp_path, interrupt):
    kw = dict(unfreeze_head=True, unfreeze_embeddings=True, steps_to_full=3, max_steps=8, eval_steps=4)
    full = CompressRecipe(_cfg(predecessor, toy, tmp_path / "a", **kw)).setup().train()
    part = CompressRecipe(_cfg(predecessor, toy, tmp_path / "b", **kw))
    part.cfg.stop_after_steps = interrupt
    part.setup().train()
    with pytest.raises(UsageError, match="--unfreeze-embeddings"):  # a resume setting: another value is refused
        CompressRecipe(_cfg(predecessor, toy, tmp_path / "b", resume=True,
                            **{**kw, "unfreeze_embeddings": False})).setup()
    resumed = CompressRecipe(_cfg(predecessor, toy, tmp_path / "b", resume=True, **kw)).setup()
    resumed.train()
    a, b = full.theseus.successor_state_dict(), resumed.theseus.successor_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h.get("loss") for h in full.history] == [h.get("loss") for h in resumed.history]


def test_trainable_set_is_decided_before_wrapping(predecessor, toy, tmp_path, monkeypatch):
    """DDP all-reduces what requires grad when the model is wrapped: the head must already be in
    that set (and in the optimizer), and the set must not change during training."""
    import accelerate

    seen = {}
    original = accelerate.Accelerator.prepare

    def spy(self, *objs, **kw):
        for o in objs:
            if isinstance(o, torch.nn.Module):
                seen["model"] = {n for n, p in o.named_parameters() if p.requires_grad}
            if isinstance(o, torch.optim.Optimizer):
                seen["optimizer"] = {id(p) for g in o.param_groups for p in g["params"]}
        return original(self, *objs, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "prepare", spy)
    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", unfreeze_head=True, steps_to_full=2, max_steps=4)).setup()
    head_names = {n for n, p in r.theseus.named_parameters() if any(p is h for h in r.theseus.head_parameters())}
    succ_names = {n for n, p in r.theseus.named_parameters() if ".successor." in n}
    assert head_names and seen["model"] == head_names | succ_names
    assert {id(p) for p in r.theseus.head_parameters()} <= seen["optimizer"]
    r.train()
    assert {n for n, p in r.theseus.named_parameters() if p.requires_grad} == seen["model"]
    # without --unfreeze-head the head is never trainable
    CompressRecipe(_cfg(predecessor, toy, tmp_path / "p", unfreeze_head=False, steps_to_full=2, max_steps=4)).setup()
    assert seen["model"] == succ_names


def test_one_optimizer_recipe_decay_groups(tiny_bert):
    from transformers import AutoModelForSequenceClassification as Auto

    from theseus_deploy.optim import configure_optimizers

    model = Auto.from_pretrained(tiny_bert)
    opt = configure_optimizers(model, 1e-3, 0.01)
    by_name = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in opt.param_groups}
    no_decay = {by_name[id(p)] for p in groups["no_decay"]["params"]}
    # the reference BERT(-of-Theseus) list: no decay on biases and LayerNorm weights
    assert no_decay == {n for n, _ in model.named_parameters() if "bias" in n or "LayerNorm.weight" in n}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.01
    everything = configure_optimizers(model, 1e-3, 0.01, decay_norm_and_bias=True)
    assert [g["name"] for g in everything.param_groups] == ["decay"]


def test_finetune_and_compress_share_configure_optimizers(predecessor, toy, tmp_path, monkeypatch):
    import theseus_deploy.recipes.loop as T
    from theseus_deploy.config import FinetuneConfig
    from theseus_deploy.recipes.finetune import FinetuneRecipe

    calls = []
    real = T.configure_optimizers
    monkeypatch.setattr(T, "configure_optimizers", lambda *a, **k: calls.append(k) or real(*a, **k))
    CompressRecipe(_cfg(predecessor, toy, tmp_path / "c", max_grad_norm=0.5)).setup()
    args = dict(zip([a.lstrip("-").replace("-", "_") for a in toy[::2]], toy[1::2]))
    FinetuneRecipe(FinetuneConfig(**args, model=str(predecessor), output=str(tmp_path / "f"), max_steps=2,
                                  max_seq_length=16, decay_norm_and_bias=True)).setup()
    assert [c["decay_norm_and_bias"] for c in calls] == [False, True]


def test_gradient_clipping_bounds_the_update(predecessor, toy, tmp_path):
    """--max-grad-norm clips the global norm: with SGD-like first steps the norm logged before
    clipping is above the bound, and the recorded norm disappears when clipping is off."""
    on = CompressRecipe(_cfg(predecessor, toy, tmp_path / "a", replacing_rate=1.0, max_steps=3, max_grad_norm=1e-3)).setup()
    seen = []
    real = on.acc.clip_grad_norm_

    def spy(params, max_norm):
        norm = real(params, max_norm)
        seen.append(float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        return norm

    on.acc.clip_grad_norm_ = spy
    on.train()
    assert seen and all(n <= 1e-3 * (1 + 1e-4) for n in seen)
    assert all(h["grad_norm"] > 1e-3 for h in on.history if "loss" in h)
    off = CompressRecipe(_cfg(predecessor, toy, tmp_path / "b", replacing_rate=1.0, max_steps=3, max_grad_norm=0)).setup()
    off.train()
    assert all(h["grad_norm"] is None for h in off.history if "loss" in h)


def test_early_stopping_counts_only_the_successor_only_phase(predecessor, toy, tmp_path):
    # lr so small that no evaluation ever improves on the first: every later one is "bad"
    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", lr=1e-12, eval_steps=1, steps_to_full=4, max_steps=10,
                            early_stopping_patience=2)).setup().train()
    evals = [h["step"] for h in r.history if "eval" in h]
    # evaluations at steps 1-4 follow replacement steps (p < 1) and do not count; 5 and 6 do
    assert evals == [1, 2, 3, 4, 5, 6] and r.step == 6


def test_schedule_that_never_reaches_p1_is_refused(predecessor, toy, tmp_path):
    for extra in (["--steps-to-full", "8"], ["--k", "0.01"]):
        r = CliRunner().invoke(cli, ["compress", "--model", str(predecessor), *toy, "--output", str(tmp_path / "o"),
                                     "--max-steps", "8", "--max-seq-length", "16", *extra])
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines()[-1].startswith("error: the replacement schedule reaches p = 1 only at step")
        assert "Traceback" not in r.output and not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    ok = CompressRecipe(_cfg(predecessor, toy, tmp_path / "p", max_steps=8, steps_to_full=7)).setup()  # last step at p = 1
    assert ok.scheduler.successor_only(7)


def test_best_weights_agree_with_the_checkpoint_after_resume(predecessor_top, toy, tmp_path, monkeypatch):
    """Killed between an evaluation that improved and the next checkpoint: the resumed run's best
    weights are those of the best step its checkpoint records."""
    import itertools

    import theseus_deploy.recipes.loop as T  # the evaluations' compute_metrics

    calls = itertools.count(1)  # every evaluation improves on the last: best is always the newest
    monkeypatch.setattr(T, "compute_metrics", lambda *a, **k: dict.fromkeys(("f1", "accuracy", "score"), next(calls) / 1000))
    kw = dict(eval_steps=1, save_steps=10, max_steps=16, steps_to_full=6)
    a = CompressRecipe(_cfg(predecessor_top, toy, tmp_path / "o", **kw))
    a.cfg.stop_after_steps = 3
    a.setup().train()
    best3 = (a.best_step, a.best_score, {k: v.clone() for k, v in a.best_state.items()})
    ckpt = tmp_path / "o.partial" / "checkpoint.pt"
    saved = ckpt.read_bytes()
    b = CompressRecipe(_cfg(predecessor_top, toy, tmp_path / "o", resume=True, **kw))
    b.cfg.stop_after_steps = 9
    b.setup().train()
    assert b.best_step > best3[0], "the scenario needs an improvement after the step-3 checkpoint"
    ckpt.write_bytes(saved)  # as if killed at step 9, before the step-10 checkpoint: the last one is step 3's
    r = CompressRecipe(_cfg(predecessor_top, toy, tmp_path / "o", resume=True, **kw)).setup()
    assert r.step == 3 and (r.best_step, r.best_score) == best3[:2]
    assert r.best_state.keys() == best3[2].keys() and all(torch.equal(r.best_state[k], best3[2][k]) for k in best3[2])
    assert not list((tmp_path / "o.partial").glob("best*"))  # no second file that can disagree


def test_nan_loss_stops_with_one_line_and_writes_no_nan(predecessor, toy, tmp_path):
    from theseus_deploy.errors import UsageError

    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", replacing_rate=1.0, max_steps=4)).setup()
    with torch.no_grad():
        next(iter(r.theseus.successor_parameters())).fill_(float("nan"))
    with pytest.raises(UsageError, match=r"the training loss is nan at step 0: training diverged") as e:
        r.train()
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
    assert all(not isinstance(v, float) or v == v for h in r.history for v in h.values())


# ====================================================================== checkpoints
def _partial_run(predecessor, toy, out, step=2):
    part = CompressRecipe(_cfg(predecessor, toy, out))
    part.cfg.stop_after_steps = step
    part.setup().train()
    return out.with_name(out.name + ".partial") / "checkpoint.pt"


def _resume_cli(predecessor, toy, out):
    return CliRunner().invoke(cli, ["compress", "--model", str(predecessor), *toy, "--output", str(out), "--lr", "1e-3",
                                    "--max-steps", "8", "--eval-steps", "4", "--batch-size", "16",
                                    "--max-seq-length", "16", "--log-steps", "1", "--resume"])


def test_crafted_checkpoint_is_refused_and_runs_nothing(predecessor, toy, tmp_path):
    class Payload:
        def __init__(self, path):
            self.path = path

        def __reduce__(self):
            return (open, (self.path, "w"))  # loading this would create the file

    ckpt = _partial_run(predecessor, toy, tmp_path / "o")
    control, marker = tmp_path / "control", tmp_path / "pwned"
    torch.save({"x": Payload(str(control))}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()  # the payload works when unpickled unsafely
    state = torch.load(ckpt, weights_only=True)
    state["history"].append(Payload(str(marker)))
    torch.save(state, ckpt)
    r = _resume_cli(predecessor, toy, tmp_path / "o")
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error: --resume: cannot read") and "Traceback" not in r.output
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "foreign"])
def test_damaged_checkpoint_is_one_error_line(predecessor, toy, tmp_path, damage):
    ckpt = _partial_run(predecessor, toy, tmp_path / "o")
    data = ckpt.read_bytes()
    if damage == "truncate":  # kill -9 mid-write of a non-atomic writer
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, ckpt)
    before = ckpt.read_bytes()
    r = _resume_cli(predecessor, toy, tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1].startswith("error: --resume: ") and "Traceback" not in r.output
    assert ckpt.read_bytes() == before and not (tmp_path / "o").exists()  # nothing of the user's removed


def test_checkpoint_is_written_atomically(predecessor, toy, tmp_path, monkeypatch):
    ckpt = _partial_run(predecessor, toy, tmp_path / "o")
    good = ckpt.read_bytes()
    r = CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", resume=True)).setup()

    def dies(obj, f, *a, **k):
        f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        r.save_checkpoint()
    assert ckpt.read_bytes() == good and [p.name for p in ckpt.parent.iterdir()] == ["checkpoint.pt"]


RESUME_FIELDS = [("max_eval_samples", 64), ("eval_steps", 2), ("save_steps", 2), ("early_stopping_patience", 3),
                 ("problem_type", "classification")]


@pytest.mark.parametrize("field,value", RESUME_FIELDS, ids=[f for f, _ in RESUME_FIELDS])
def test_resume_refuses_changed_evaluation_settings(predecessor, toy, tmp_path, field, value):
    from theseus_deploy.errors import UsageError

    _partial_run(predecessor, toy, tmp_path / "o")
    flag = "--" + field.replace("_", "-")
    with pytest.raises(UsageError, match=rf"--resume with settings that differ .*{flag} "):
        CompressRecipe(_cfg(predecessor, toy, tmp_path / "o", resume=True, **{field: value})).setup()


# ====================================================================== golden loss trajectories
def golden_losses(kind, tmp_path, toy, **kw):
    """Per-step training losses of a 6-step run on a random tiny BERT (seed 0): lr and weight
    decay are large so that the decay groups and clipping show in the losses."""
    from theseus_deploy.config import FinetuneConfig
    from theseus_deploy.recipes.finetune import FinetuneRecipe

    from tiny import builtin_tokenizer

    base = make_tiny_model(tmp_path / "base", "bert", 4, seed=0)
    for name in ("tokenizer.json", "vocab.txt"):  # the built-in vocabulary: the same ids with or without ../shared
        (base / name).unlink(missing_ok=True)
    builtin_tokenizer().save_pretrained(base)
    args = dict(zip([a.lstrip("-").replace("-", "_") for a in toy[::2]], toy[1::2]))
    common = dict(model=str(base), output=str(tmp_path / "o"), lr=1e-2, weight_decay=0.5, max_steps=6, eval_steps=6,
                  batch_size=16, max_seq_length=16, log_steps=1, max_train_samples=96, max_eval_samples=16)
    common.update(kw)
    if kind == "finetune":
        r = FinetuneRecipe(FinetuneConfig(**args, **common)).setup().train()
    else:
        r = CompressRecipe(CompressConfig(**args, **common, steps_to_full=3, unfreeze_head=True)).setup().train()
    return [h["loss"] for h in r.history if "loss" in h]


# Recorded from this code (CPU, float32, the built-in tokenizer; identical without ../shared).
# Measured sensitivity of these runs: clipping off moves a loss by up to 1.9e-2 (finetune) /
# 1.9e-4 (compress); decay on biases and LayerNorm weights by up to 2.7e-4 / 3.2e-4 - all far
# beyond the tolerance.
GOLDEN = {"finetune": [0.6922246217727661, 0.6821920871734619, 0.7398927211761475, 0.6886672377586365, 0.689712405204773, 0.709804892539978],
          "compress": [0.691760778427124, 0.6913362741470337, 0.6964377164840698, 0.6922823190689087, 0.6878891587257385, 0.7163718342781067]}


@pytest.mark.parametrize("kind", ["finetune", "compress"])
def test_golden_loss_trajectory(kind, tmp_path, toy):
    losses = golden_losses(kind, tmp_path, toy, max_grad_norm=0.1)
    assert losses == pytest.approx(GOLDEN[kind], abs=3e-6, rel=0)


def test_finetune_stop_after_steps_then_resume_is_bit_identical(tmp_path, toy):
    """finetune is time-sliced like compress (MPNet-base predecessors take CPU-hours): the resumed
    run's weights equal an uninterrupted run's, with dropout on."""
    base = make_tiny_model(tmp_path / "base", "bert", 2)
    args = ["finetune", "--model", str(base), *toy, "--lr", "1e-3", "--max-steps", "6", "--eval-steps", "3",
            "--batch-size", "16", "--max-seq-length", "16"]
    assert run([*args, "--output", str(tmp_path / "full")]).exit_code == 0
    r = run([*args, "--output", str(tmp_path / "cut"), "--stop-after-steps", "4"])
    assert r.exit_code == 0 and "paused after step 4" in r.output and not (tmp_path / "cut").exists()
    r = run([*args, "--output", str(tmp_path / "cut"), "--resume"])
    assert r.exit_code == 0, r.output
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cut").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
