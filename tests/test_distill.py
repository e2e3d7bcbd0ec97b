"""Knowledge distillation (compress --distill-alpha, finetune --keep-layers --distill-alpha) and
loyalty (compress's summary, evaluate --reference) on tiny models and hand-computed arrays."""
import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import make_tiny_model
from test_train import WORDS, write_toy
import theseus_deploy.distill as distill
from theseus_deploy.cli import cli
from theseus_deploy.config import CompressConfig, FinetuneConfig
from theseus_deploy.distill import combine, soft_target_loss, student_order
from theseus_deploy.errors import UsageError
from theseus_deploy.loyalty import js_distance, loyalty
from theseus_deploy.recipes.common import predict
from theseus_deploy.recipes.compress import CompressRecipe
from theseus_deploy.recipes.finetune import FinetuneRecipe

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return {"task": "custom", "train_file": write_toy(d / "train.csv", 192, 0),
            "validation_file": write_toy(d / "dev.csv", 48, 1), "text_columns": "text", "label_column": "label"}


def toy_args(toy):
    return [a for k, v in toy.items() for a in (f"--{k.replace('_', '-')}", v)]


@pytest.fixture(scope="module")
def predecessor(tmp_path_factory, toy):
    base = make_tiny_model(tmp_path_factory.mktemp("m") / "base", "bert", 4)
    out = tmp_path_factory.mktemp("ft") / "pred"
    r = CliRunner().invoke(cli, ["finetune", "--model", str(base), *toy_args(toy), "--output", str(out), "--lr", "1e-3",
                                 "--max-steps", "24", "--eval-steps", "24", "--batch-size", "16", "--max-seq-length", "16"])
    assert r.exit_code == 0, r.output
    return out


def ccfg(predecessor, toy, out, **kw):
    base = dict(model=str(predecessor), output=str(out), lr=1e-3, max_steps=8, eval_steps=4, batch_size=16,
                max_seq_length=16, log_steps=1, unfreeze_head=True, steps_to_full=3)
    return CompressConfig(**toy, **{**base, **kw})


def fcfg(predecessor, toy, out, **kw):
    base = dict(model=str(predecessor), output=str(out), lr=1e-3, max_steps=6, eval_steps=3, batch_size=16,
                max_seq_length=16, log_steps=1, keep_layers=2)
    return FinetuneConfig(**toy, **{**base, **kw})


def successor(r):
    return {k: v.clone() for k, v in r.final_state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the loss
def test_soft_loss_is_zero_when_student_equals_teacher_and_matches_hand_values():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    for t in (1.0, 2.0, 7.5):
        assert soft_target_loss(z, z.clone(), t, regression=False).item() == pytest.approx(0.0, abs=1e-7)
    assert soft_target_loss(z[:, :1], z[:, :1].clone(), 1.0, regression=True).item() == 0.0
    # by hand: T^2 * mean over rows of sum_j p_t log(p_t / p_s), softmax at T
    s, t, T = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[0.0, 1.0], [1.0, 1.0]]), 2.0
    sm = lambda x: np.exp(x / T) / np.exp(x / T).sum(-1, keepdims=True)  # noqa: E731
    ps, pt = sm(s), sm(t)
    want = T * T * np.mean((pt * np.log(pt / ps)).sum(-1))
    got = soft_target_loss(torch.tensor(s), torch.tensor(t), T, regression=False).item()
    assert got == pytest.approx(want, rel=1e-6) and got > 0
    assert soft_target_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [1.0]]), 5.0, True).item() == 2.5
    assert combine(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == 0.75 * 2 + 0.25 * 4


def test_student_order_puts_teacher_columns_in_the_students_label_order():
    assert student_order(None, None, 3) is None
    # data labels (a, b, c): teacher ids (2, 0, 1), student ids (1, 2, 0)
    order = student_order(np.array([2, 0, 1]), np.array([1, 2, 0]), 3)
    teacher = torch.tensor([[10.0, 20.0, 30.0]])  # teacher: id0 = b, id1 = c, id2 = a
    # student: id0 = c (teacher 1), id1 = a (teacher 2), id2 = b (teacher 0)
    assert teacher[:, order].tolist() == [[20.0, 30.0, 10.0]]


# ------------------------------------------------------------------ compress + KD
def test_compress_alpha_zero_is_bit_identical_and_alpha_changes_training(predecessor, toy, tmp_path):
    plain = CompressRecipe(ccfg(predecessor, toy, tmp_path / "a")).setup().train()
    off = CompressRecipe(ccfg(predecessor, toy, tmp_path / "b", distill_alpha=0.0)).setup()
    assert off.distiller is None  # no teacher forward at all
    off.train()
    assert same(successor(plain), successor(off))
    assert [h.get("loss") for h in plain.history] == [h.get("loss") for h in off.history]
    kd = CompressRecipe(ccfg(predecessor, toy, tmp_path / "c", distill_alpha=0.5, distill_temperature=2.0)).setup().train()
    assert not same(successor(plain), successor(kd))
    assert kd.summary()["distill"] == {"alpha": 0.5, "temperature": 2.0}


@pytest.mark.parametrize("embeddings", [False, True])
def test_compress_teacher_is_the_predecessor_with_its_original_head(embeddings, predecessor, toy, tmp_path):
    """The teacher's logits are the predecessor's (eval mode), also after --unfreeze-head changed the
    head and --unfreeze-embeddings the embeddings."""
    r = CompressRecipe(ccfg(predecessor, toy, tmp_path / "o", distill_alpha=0.5, max_steps=8, steps_to_full=2,
                            unfreeze_embeddings=embeddings)).setup()
    emb0 = [p.detach().clone() for p in r.theseus.embedding_parameters()]
    r.train()
    assert r.head_unfrozen
    assert any(not torch.equal(a, b) for a, b in zip(emb0, r.theseus.embedding_parameters())) == embeddings
    ref = AutoModelForSequenceClassification.from_pretrained(predecessor).eval()
    batch = next(iter(r.dev_loader))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = ref(**batch).logits
    torch.testing.assert_close(r.distiller.teacher(batch), want, rtol=1e-5, atol=1e-6)
    assert r.theseus.training and all(m.force is None for m in r.theseus.modules_)  # mode restored


def test_compress_teacher_head_follows_the_model_when_it_moves(predecessor):
    """The teacher's copy of the original head moves with the model: the accelerator moves the
    wrapper to its device after the teacher is built (a copy left on the CPU fails on a GPU with
    a device mismatch). A cast to float64 moves every parameter the way .to(device) does."""
    from contextlib import nullcontext

    from theseus_deploy.distill import theseus_teacher
    from theseus_deploy.modeling import TheseusModel

    theseus = TheseusModel(AutoModelForSequenceClassification.from_pretrained(predecessor), 2)
    teacher = theseus_teacher(theseus, nullcontext)
    theseus.to(torch.float64)
    batch = {"input_ids": torch.tensor([[101, 1996, 2143, 102], [101, 2307, 102, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    ref = AutoModelForSequenceClassification.from_pretrained(predecessor).to(torch.float64).eval()
    with torch.no_grad():
        want = ref(**batch).logits
    got = teacher(batch)
    assert got.dtype == torch.float32  # the soft targets are float32, as before
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


# before / after the head starts learning (step 3); the second with length-grouped batches too
@pytest.mark.parametrize("interrupt,group", [(2, False), (5, True)])
def test_compress_resume_with_kd_is_bit_identical(predecessor, toy, tmp_path, interrupt, group):
    kw = dict(distill_alpha=0.7, distill_temperature=3.0, group_by_length=group)
    full = CompressRecipe(ccfg(predecessor, toy, tmp_path / "a", **kw)).setup().train()
    part = CompressRecipe(ccfg(predecessor, toy, tmp_path / "b", **kw))
    part.cfg.stop_after_steps = interrupt
    part.setup().train()
    resumed = CompressRecipe(ccfg(predecessor, toy, tmp_path / "b", resume=True, **kw)).setup()
    assert resumed.step == interrupt
    resumed.train()
    assert same(successor(full), successor(resumed))
    assert [h.get("loss") for h in full.history] == [h.get("loss") for h in resumed.history]
    assert full.summary()["loyalty"] == resumed.summary()["loyalty"]
    with pytest.raises(UsageError, match="--distill-alpha 0.7 -> 0.5"):
        CompressRecipe(ccfg(predecessor, toy, tmp_path / "b", resume=True, distill_alpha=0.5,
                            distill_temperature=3.0)).setup()


def test_resume_of_a_checkpoint_from_before_distillation(predecessor, toy, tmp_path):
    """A run paused by a version without the distillation options (its checkpoint's config has no
    distill_* keys) resumes without them: A = 0 is the code path of that version. With KD it is
    refused (that run had none)."""
    full = CompressRecipe(ccfg(predecessor, toy, tmp_path / "a")).setup().train()
    part = CompressRecipe(ccfg(predecessor, toy, tmp_path / "b"))
    part.cfg.stop_after_steps = 3
    part.setup().train()
    path = tmp_path / "b.partial" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["distill_alpha"], state["config"]["distill_temperature"]
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"--distill-alpha 0.0 -> 0.5"):
        CompressRecipe(ccfg(predecessor, toy, tmp_path / "b", resume=True, distill_alpha=0.5)).setup()
    resumed = CompressRecipe(ccfg(predecessor, toy, tmp_path / "b", resume=True)).setup().train()
    assert same(successor(full), successor(resumed))


@pytest.mark.parametrize("later_improves", [False, True])
@pytest.mark.parametrize("recipe", ["compress", "finetune"])
def test_resume_of_a_checkpoint_from_before_loyalty(recipe, later_improves, predecessor, toy, tmp_path, capsys):
    """A checkpoint whose best weights carry no loyalty figure (written before loyalty was measured)
    resumes, saying in one line that the kept weights have none (a checkpoint with its figure says
    nothing); the training is the uninterrupted run's. metrics.json has no loyalty entry while those
    weights stay the best (here: the checkpoint's best score raised out of reach), none is made up;
    when a later evaluation replaces them (the best score lowered, so step 8's evaluation wins) it
    has that evaluation's figure, the uninterrupted run's at step 8."""
    Recipe, cfg = (CompressRecipe, ccfg) if recipe == "compress" else (FinetuneRecipe, fcfg)
    kw = dict(max_steps=8, eval_steps=4)
    full = Recipe(cfg(predecessor, toy, tmp_path / "a", **kw)).setup().train()
    part = Recipe(cfg(predecessor, toy, tmp_path / "b", **kw))
    part.cfg.stop_after_steps = 5  # the step-4 evaluation's weights are the best kept
    part.setup().train()
    capsys.readouterr()
    Recipe(cfg(predecessor, toy, tmp_path / "b", resume=True, **kw)).setup()
    assert "no loyalty figure" not in capsys.readouterr().err  # a checkpoint with its figure
    path = tmp_path / "b.partial" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    loy = state["best"].pop("loyalty")
    assert state["best"]["step"] == 4 and loy
    state["best"]["score"] = -1e9 if later_improves else 1e9
    torch.save(state, path)
    resumed = Recipe(cfg(predecessor, toy, tmp_path / "b", resume=True, **kw)).setup()
    said = [x for x in capsys.readouterr().err.splitlines() if "no loyalty figure" in x]
    assert len(said) == 1 and "best weights (step 4)" in said[0], said
    resumed.train()
    assert same(successor(full), successor(resumed))
    m = resumed.metrics()
    if later_improves:
        at8 = [h["loyalty"] for h in full.history if h.get("step") == 8 and "eval" in h]
        assert m["best_step"] == 8 and len(at8) == 1 and m["loyalty"] == at8[0]
    else:
        assert m["best_step"] == 4 and "loyalty" not in m


def test_resume_of_a_run_that_measures_no_loyalty_says_nothing_of_it(predecessor, toy, tmp_path, capsys):
    """A plain fine-tune (no --keep-layers, no teacher) has nothing to be loyal to: its checkpoints
    never carry a figure, and resuming one is not a checkpoint from before loyalty."""
    part = FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "b", keep_layers=None, max_steps=8, eval_steps=4))
    part.cfg.stop_after_steps = 5
    part.setup().train()
    assert part.reference_logits is None and part.best_step == 4
    capsys.readouterr()
    FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "b", keep_layers=None, max_steps=8, eval_steps=4,
                        resume=True)).setup()
    err = capsys.readouterr().err
    assert "resumed from" in err and "no loyalty figure" not in err


def test_compress_reports_loyalty_in_summary_and_metrics(predecessor, toy, tmp_path):
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["compress", "--model", str(predecessor), *toy_args(toy), "--output", str(out),
                                 "--max-steps", "6", "--eval-steps", "3", "--batch-size", "16", "--max-seq-length", "16",
                                 "--distill-alpha", "0.5", "--distill-temperature", "2"])
    assert r.exit_code == 0, r.output
    assert "loyalty to the predecessor: label " in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["loyalty"]) == {"label", "probability"} and 0 <= m["loyalty"]["label"] <= 1
    # the figure is the successor's loyalty on dev, recomputed here from the two saved models
    ev = CliRunner().invoke(cli, ["evaluate", "--model", str(out), "--reference", str(predecessor), *toy_args(toy),
                                  "--max-seq-length", "16", "--json"])
    assert ev.exit_code == 0, ev.output
    e = json.loads(ev.output[ev.output.index("{"):])
    assert e["loyalty"]["label"] == pytest.approx(m["loyalty"]["label"])
    assert e["loyalty"]["probability"] == pytest.approx(m["loyalty"]["probability"], abs=1e-5)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert all("loyalty" in h for h in log if "eval" in h)
    # the soft-target term is logged beside the combined loss: loss = (1 - A) task + A soft, so
    # with A = 0.5 each logged step's soft loss is a positive number of the same order
    steps = [h for h in log if "loss" in h and h["loss"] is not None]
    assert steps and all(h["soft_loss"] is not None and h["soft_loss"] >= 0 for h in steps)
    assert all(h["soft_loss"] <= 2 * h["loss"] + 1e-6 for h in steps)  # (1-A) task >= 0, so A soft <= loss


# ------------------------------------------------------------------ vanilla KD (finetune)
def test_finetune_vanilla_kd_teacher_is_the_model_before_truncation(predecessor, toy, tmp_path):
    plain = FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "a")).setup().train()
    # the truncation baseline's loyalty is to --model before truncation too (no KD: no "distill" entry)
    assert set(plain.summary()["loyalty"]) == {"label", "probability"} and "distill" not in plain.summary()
    assert all("soft_loss" not in h for h in plain.history)  # no distillation: the log is as before
    kd = FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "b", distill_alpha=0.5, distill_temperature=2.0)).setup()
    assert kd.teacher.config.num_hidden_layers == 4 and kd.hf_config.num_hidden_layers == 2
    assert not any(p.requires_grad for p in kd.teacher.parameters())
    kd.train()
    assert not same(successor(plain), successor(kd))
    s = kd.save().summary()
    assert s["distill"] == {"alpha": 0.5, "temperature": 2.0, "teacher": str(predecessor)}
    assert set(s["loyalty"]) == {"label", "probability"}
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["loyalty"] == s["loyalty"]


@pytest.mark.parametrize("extra,against", [
    (["--distill-alpha", "0.5", "--distill-temperature", "2"], "the teacher {pred}"),
    ([], "{pred} before truncation"),
])
def test_finetune_prints_its_loyalty_in_the_summary_as_compress_does(extra, against, predecessor, toy, tmp_path):
    """finetune --keep-layers (with a teacher, or against --model before truncation) wrote its loyalty
    to metrics.json only; compress prints its own after the table. Now both print it, the same figure."""
    from theseus_deploy.loyalty import describe

    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["finetune", "--model", str(predecessor), *toy_args(toy), "--output", str(out),
                                 "--keep-layers", "1", "--max-steps", "4", "--eval-steps", "2", "--batch-size", "16",
                                 "--max-seq-length", "16", *extra])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert f"loyalty to {against.format(pred=predecessor)}: {describe(m['loyalty'])}" in r.output.splitlines()


def test_finetune_kd_resume_is_bit_identical(predecessor, toy, tmp_path):
    kw = dict(distill_alpha=0.6, distill_temperature=2.0)
    full = FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "a", **kw)).setup().train()
    part = FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "b", **kw))
    part.cfg.stop_after_steps = 4
    part.setup().train()
    resumed = FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "b", resume=True, **kw)).setup().train()
    assert same(successor(full), successor(resumed))


def tiny_distilbert(path):
    """A random 2-label DistilBERT (no segment embedding: it takes no token_type_ids) with the tiny models' tokenizer."""
    from transformers import DistilBertConfig

    from tiny import tiny_tokenizer

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=514)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_finetune_teacher_that_reads_token_type_ids_the_student_lacks_is_refused_on_pairs(predecessor, toy, tmp_path):
    """A BERT teacher for a DistilBERT student: the batches carry the student's inputs only, so on a
    text-pair task the teacher would see every token as the first text's (token_type_ids all 0)
    and its soft targets and the loyalty reference would be another model's. Refused; on a
    single-text task the missing ids are the zeros the tokenizer gives, and the run goes ahead."""
    student = tiny_distilbert(tmp_path / "distil")
    kw = dict(model=student, output=str(tmp_path / "o"), max_steps=1, batch_size=16, max_seq_length=16,
              distill_alpha=0.5, teacher=str(predecessor))
    rng = np.random.default_rng(0)
    rows = ["a,b,label"] + [f"{' '.join(rng.choice(WORDS, 4))},{' '.join(rng.choice(WORDS, 4))},{i % 2}" for i in range(32)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    pairs = {"task": "custom", "train_file": str(tmp_path / "pairs.csv"), "validation_file": str(tmp_path / "pairs.csv"),
             "text_columns": "a,b", "label_column": "label"}
    with pytest.raises(UsageError, match="reads token_type_ids"):
        FinetuneRecipe(FinetuneConfig(**pairs, **kw)).setup()
    r = FinetuneRecipe(FinetuneConfig(**toy, **kw)).setup()
    assert r.distiller is not None and r.reference_logits is not None


def test_a_teacher_or_reference_of_another_label_set_is_named_in_the_error(predecessor, toy, tmp_path):
    """The label check of --teacher / --reference says which model is wrong (it said "the model has
    3 labels", as if --model were)."""
    three = make_tiny_model(tmp_path / "three", "bert", 2, num_labels=3)
    with pytest.raises(UsageError, match=re.escape(f"teacher '{three}': the model has 3 labels but task custom has 2")):
        FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "o", distill_alpha=0.5, teacher=str(three))).setup()
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(predecessor), "--reference", str(three), *toy_args(toy),
                                 "--max-seq-length", "16", "--output", str(tmp_path / "e.json")])
    assert r.exit_code == 2 and f"--reference {three}: the model has 3 labels" in r.output, r.output
    assert not (tmp_path / "e.json").exists() and "score" not in r.output  # refused before --model was scored


BAD = [
    (["compress", "--distill-alpha", "1.5"], "--distill-alpha must be at least 0 and at most 1, got 1.5"),
    (["compress", "--distill-alpha", "nan"], "--distill-alpha must be a finite number"),
    (["compress", "--distill-alpha", "0.5", "--distill-temperature", "0"], "--distill-temperature must be greater than 0"),
    (["finetune", "--distill-alpha", "-0.1", "--keep-layers", "2"], "--distill-alpha must be at least 0"),
    (["finetune", "--distill-alpha", "0.5"], "--distill-alpha needs a teacher: --keep-layers N"),
    (["finetune", "--teacher", "{pred}", "--keep-layers", "2"], "--teacher needs --distill-alpha above 0"),
    # a temperature without distillation was ignored: the run trained without KD, as if it had not been given
    (["compress", "--distill-temperature", "4"], "--distill-temperature 4 needs --distill-alpha above 0"),
    (["finetune", "--distill-temperature", "2", "--keep-layers", "2"], "--distill-temperature 2 needs --distill-alpha"),
    (["compress", "--distill-alpha", "0", "--distill-temperature", "3"], "--distill-temperature 3 needs --distill-alpha"),
    (["finetune", "--distill-alpha", "0.5", "--teacher", "{tmp}/nope"], "model path does not exist"),
    (["evaluate", "--reference", "{tmp}/nope"], "model path does not exist"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_distill_flags_one_line_exit_2_nothing_written(args, msg, predecessor, toy, tmp_path):
    """Real processes (click's runner misses what libraries print to stderr)."""
    import subprocess
    import sys

    fmt = {"pred": str(predecessor), "tmp": str(tmp_path)}
    argv = [args[0], "--model", str(predecessor), *toy_args(toy), "--max-seq-length", "16",
            *[a.format(**fmt) for a in args[1:]]]
    if args[0] != "evaluate":
        argv += ["--output", str(tmp_path / "out"), "--max-steps", "2"]
    before = sorted(tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "theseus_deploy", *argv], capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], r.stderr
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_teacher_or_reference_whose_tokenizer_overruns_its_embeddings(command, predecessor, toy, tmp_path):
    """--teacher / --reference whose config's vocab_size is below its tokenizer's ids (as --model is
    checked): one line, exit 2, nothing written (it was an IndexError traceback mid-run)."""
    import subprocess
    import sys

    from tiny import tiny_config, tiny_tokenizer

    config = tiny_config("bert", 2)
    config.vocab_size = 200
    small = tmp_path / "models" / "small"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(small)
    tiny_tokenizer().save_pretrained(small)
    work = tmp_path / "work"
    work.mkdir()
    argv = [command, "--model", str(predecessor), *toy_args(toy), "--max-seq-length", "16"]
    if command == "finetune":
        argv += ["--keep-layers", "2", "--distill-alpha", "0.5", "--teacher", str(small), "--max-steps", "2",
                 "--output", str(work / "out")]
    else:
        argv += ["--reference", str(small), "--output", str(work / "e.json")]
    r = subprocess.run([sys.executable, "-m", "theseus_deploy", *argv], capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), r.stderr[-2000:]
    assert f"model '{small}': its tokenizer has" in err[0] and "vocab_size is 200" in err[0]
    assert list(work.iterdir()) == []


def bare_encoder(path):
    """A tiny BERT encoder without a classifier head (architectures: BertModel)."""
    from transformers import BertModel

    from tiny import tiny_config, tiny_tokenizer

    BertModel(tiny_config("bert", 2)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_compress_of_a_model_that_is_not_a_fine_tuned_classifier_is_refused(toy, tmp_path):
    """compress --model given the bare encoder (not the fine-tuned predecessor): it ran with a new
    random head and reported retention 100% and loyalty ~1 to that noise. One line, exit 2, nothing written."""
    import subprocess
    import sys

    bare = bare_encoder(tmp_path / "models" / "bare")
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "theseus_deploy", "compress", "--model", bare, *toy_args(toy),
                        "--max-seq-length", "16", "--max-steps", "2", "--output", str(work / "out")],
                       capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), r.stderr[-2000:]
    assert f"--model '{bare}' is not a fine-tuned classifier (architectures: BertModel)" in err[0]
    assert list(work.iterdir()) == []


def test_evaluate_reference_that_is_not_a_fine_tuned_classifier_is_refused(predecessor, toy, tmp_path):
    """A bare encoder as --reference loads with a new random head: its "loyalty" measured noise (it
    printed label 0.0 for a model against a random head). Refused before --model is scored, as a
    --teacher of that kind is."""
    bare_encoder(tmp_path / "bare")
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(predecessor), "--reference", str(tmp_path / "bare"),
                                 *toy_args(toy), "--max-seq-length", "16", "--output", str(tmp_path / "e.json")])
    assert r.exit_code == 2 and "is not a fine-tuned classifier (architectures: BertModel)" in r.output, r.output
    assert not (tmp_path / "e.json").exists() and "score" not in r.output


# ------------------------------------------------------------------ loyalty
def test_loyalty_by_hand():
    a = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -3.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [3.0, -3.0]])
    # argmax: a (0, 1, 0, 0), b (0, 0, 0, 0): 3 of 4 agree (ties take the first label)
    loy = loyalty(a, b, regression=False)
    assert loy["label"] == 0.75
    # JS distance, base 2, by hand for each row
    def p(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    def jsd(x, y):
        m = (x + y) / 2
        return np.sqrt((np.sum(x * np.log2(x / m)) + np.sum(y * np.log2(y / m))) / 2)

    d = [jsd(p(x), p(y)) for x, y in zip(a, b)]
    assert d[2] == 0 and d[3] == 0 and 0 < d[0] < d[1] < 1
    assert loy["probability"] == pytest.approx(1 - np.mean(d), abs=1e-12)
    # the extremes: disjoint one-hot distributions are 1 apart (base 2), identical ones 0
    assert js_distance(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))[0] == pytest.approx(1.0)
    assert js_distance(np.array([[0.3, 0.7]]), np.array([[0.3, 0.7]]))[0] == 0.0
    # regression: Pearson of the two predictions
    x, y = np.array([[1.0], [2.0], [3.0], [5.0]]), np.array([[2.0], [4.1], [5.9], [10.0]])
    assert loyalty(x, y, regression=True)["pearson"] == pytest.approx(np.corrcoef(x[:, 0], y[:, 0])[0, 1])
    assert loyalty(x, np.ones_like(x), regression=True)["pearson"] == 0.0


def test_evaluate_reference_itself_is_fully_loyal(predecessor, toy, tmp_path):
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(predecessor), "--reference", str(predecessor), *toy_args(toy),
                                 "--max-seq-length", "16", "--output", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert "loyalty to" in r.output and "label 1.0000, probability 1.0000" in r.output
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["loyalty"]["label"] == 1.0 and e["loyalty"]["probability"] == pytest.approx(1.0, abs=1e-6)
    assert e["reference_metrics"] == e["metrics"] and e["reference_num_layers"] == 4


def test_evaluate_reference_regression_is_pearson(tmp_path):
    rows = ["text,label"] + [f"{' '.join(WORDS[: 3 + i % 7])},{(i % 5) * 0.7:.2f}" for i in range(24)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    a = make_tiny_model(tmp_path / "a", "bert", 2, num_labels=1, seed=1)
    b = make_tiny_model(tmp_path / "b", "bert", 2, num_labels=1, seed=2)
    args = ["--task", "custom", "--validation-file", str(tmp_path / "r.csv"), "--text-columns", "text",
            "--label-column", "label", "--problem-type", "regression", "--max-seq-length", "16", "--json"]
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(a), "--reference", str(b), *args])
    assert r.exit_code == 0, r.output
    e = json.loads(r.output[r.output.index("{"):])
    assert set(e["loyalty"]) == {"pearson"} and -1 <= e["loyalty"]["pearson"] <= 1 and math.isfinite(e["loyalty"]["pearson"])
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(a), "--reference", str(a), *args])
    assert json.loads(r.output[r.output.index("{"):])["loyalty"]["pearson"] == pytest.approx(1.0)


def swapped_labels(src, path):
    """`src` with its two label ids swapped (classifier rows and id2label/label2id): the same model,
    its logits' columns in the other order. Loyalty to it must be computed by label name, not id."""
    m = AutoModelForSequenceClassification.from_pretrained(src)
    with torch.no_grad():
        m.classifier.weight.copy_(m.classifier.weight.flip(0))
        m.classifier.bias.copy_(m.classifier.bias.flip(0))
    names = [m.config.id2label[i] for i in range(2)][::-1]
    m.config.id2label, m.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    m.save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return str(path)


def test_evaluate_reference_with_its_label_ids_in_another_order_is_fully_loyal(predecessor, toy, tmp_path):
    """A reference that is the same model with its label ids swapped decides the same on every
    row: loyalty 1, not the 0 that comparing column i with column i would give."""
    ref = swapped_labels(predecessor, tmp_path / "swapped")
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(predecessor), "--reference", ref, *toy_args(toy),
                                 "--max-seq-length", "16", "--output", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["loyalty"]["label"] == 1.0 and e["loyalty"]["probability"] == pytest.approx(1.0, abs=1e-5)
    assert e["reference_metrics"]["score"] == pytest.approx(e["metrics"]["score"])


def test_finetune_teacher_with_its_label_ids_in_another_order_gives_the_students_order(predecessor, toy, tmp_path):
    """Vanilla KD from a teacher whose label ids are swapped: its soft targets and the loyalty
    reference are the unswapped model's logits, column for column, and the whole run is the run
    with the unswapped teacher, up to float rounding."""
    kw = dict(distill_alpha=0.5, distill_temperature=2.0)
    plain = FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "a", teacher=str(predecessor), **kw)).setup()
    swapped = FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "b", teacher=swapped_labels(predecessor, tmp_path / "t"),
                                  **kw)).setup()
    own, _ = predict(AutoModelForSequenceClassification.from_pretrained(predecessor), swapped.dev_loader)
    np.testing.assert_allclose(swapped.reference_logits, own, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(swapped.reference_logits, plain.reference_logits, rtol=1e-5, atol=1e-5)
    batch = next(iter(swapped.dev_loader))
    batch.pop("labels")
    torch.testing.assert_close(swapped.distiller.teacher(batch), plain.distiller.teacher(batch), rtol=1e-5, atol=1e-5)
    plain.train(), swapped.train()
    # the same run up to float rounding (teacher logits agree to 1e-5, not bit for bit); a teacher
    # read in the wrong label order would pull the student to the opposite labels
    a, b = swapped.summary()["loyalty"], plain.summary()["loyalty"]
    assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=2e-3)


def test_finetune_teacher_is_frozen_in_eval_mode_and_outside_autograd(predecessor, toy, tmp_path):
    """The vanilla-KD teacher stays in eval mode (the tiny models have dropout 0.1: in train mode two
    calls on one batch would differ) and its logits carry no graph, through training."""
    kd = FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "o", distill_alpha=0.5, distill_temperature=2.0)).setup()
    kd.train()
    assert not kd.teacher.training
    batch = next(iter(kd.dev_loader))
    batch.pop("labels")
    with torch.enable_grad():
        a, b = kd.distiller.teacher(batch), kd.distiller.teacher(batch)
    assert not a.requires_grad and torch.equal(a, b)
    own, _ = predict(AutoModelForSequenceClassification.from_pretrained(predecessor), kd.dev_loader)
    np.testing.assert_allclose(a.numpy(), own[: len(a)], rtol=1e-5, atol=1e-5)


def test_a_teacher_that_reads_fewer_inputs_gets_only_those_for_kd_and_for_the_loyalty_reference(predecessor, toy, tmp_path,
                                                                                                monkeypatch):
    """A BERT student's batches carry token_type_ids; a DistilBERT teacher takes none. Its soft
    targets and the loyalty reference both pass it only the inputs it reads (the reference passed
    every entry of the batch, which a model without **kwargs refuses)."""
    from transformers import DistilBertForSequenceClassification

    teacher = tiny_distilbert(tmp_path / "distil")
    seen = []
    forward = DistilBertForSequenceClassification.forward

    def recording(self, *args, **kwargs):
        seen.append(sorted(k for k, v in kwargs.items() if v is not None))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DistilBertForSequenceClassification, "forward", recording)
    r = FinetuneRecipe(fcfg(predecessor, toy, tmp_path / "o", teacher=teacher, distill_alpha=0.5, max_steps=2)).setup()
    assert "token_type_ids" in next(iter(r.dev_loader))  # the student's batches do carry them
    r.train()
    assert seen and all(k == ["attention_mask", "input_ids"] for k in seen), seen


@pytest.mark.parametrize("command", ["compress", "finetune", "sweep"])
def test_a_temperature_on_a_regression_task_is_refused_not_ignored(command, tmp_path):
    """Regression's soft target is the MSE of the two predictions: --distill-temperature changed
    nothing there, silently. Refused before anything is written (real processes)."""
    import subprocess
    import sys

    rows = ["text,label"] + [f"{' '.join(WORDS[: 3 + i % 7])},{(i % 5) * 0.7:.2f}" for i in range(24)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    model = make_tiny_model(tmp_path / "m", "bert", 2, num_labels=1, seed=1)
    argv = [command, "--model", str(model), "--task", "custom", "--train-file", str(tmp_path / "r.csv"),
            "--validation-file", str(tmp_path / "r.csv"), "--text-columns", "text", "--label-column", "label",
            "--problem-type", "regression", "--max-seq-length", "16", "--distill-alpha", "0.5",
            "--distill-temperature", "2", "--output", str(tmp_path / "out")]
    argv += {"compress": ["--max-steps", "2", "--successor-layers", "1"], "finetune": ["--max-steps", "2", "--keep-layers", "1"],
             "sweep": ["--depths", "1", "--backends", "torch"]}[command]
    before = sorted(tmp_path.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "theseus_deploy", *argv], capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith("error: --distill-temperature 2 has no effect on a regression task"), r.stderr
    assert sorted(tmp_path.rglob("*")) == before


# ------------------------------------------------------------------ KD on a regression task, end to end
@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    """A regression task (the score is 1.25 per 'great' in the text) and a tiny model fine-tuned on it
    for a few steps (what it learned does not matter here: only that its head is a regression one)."""
    d = tmp_path_factory.mktemp("reg")
    for name, n, seed in (("train", 192, 0), ("dev", 48, 1)):
        rng = np.random.default_rng(seed)
        rows = ["text,label"]
        for i in range(n):
            k = i % 4
            words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(4, 9)))] + ["great"] * k
            rows.append(f"{' '.join(rng.permutation(words))},{k * 1.25:.2f}")
        (d / f"{name}.csv").write_text("\n".join(rows) + "\n")
    args = ["--task", "custom", "--train-file", str(d / "train.csv"), "--validation-file", str(d / "dev.csv"),
            "--text-columns", "text", "--label-column", "label", "--problem-type", "regression",
            "--max-seq-length", "16", "--batch-size", "16"]
    base = make_tiny_model(d / "base", "bert", 4, num_labels=1)
    r = CliRunner().invoke(cli, ["finetune", "--model", str(base), *args, "--output", str(d / "pred"), "--lr", "1e-3",
                                 "--max-steps", "24", "--eval-steps", "24"])
    assert r.exit_code == 0, r.output
    i = args.index("--train-file")
    return d / "pred", args, args[:i] + args[i + 2:]


@pytest.mark.parametrize("command", ["compress", "finetune"])
def test_kd_on_a_regression_task_is_the_mse_to_the_teachers_prediction(command, regression, tmp_path, monkeypatch):
    """Theseus + KD and vanilla KD on a regression task, through the real CLI: every soft-target
    term is the MSE of the student's prediction to its teacher's, and the teacher's prediction is the
    predecessor's on that batch (one column); each trained step logs its term; the run differs from the
    one without KD, and metrics.json names the distillation and the successor's loyalty as the
    Pearson correlation of the two predictions, the figure evaluate --reference recomputes from the
    saved models."""
    pred, args, dev_args = regression
    own = AutoModelForSequenceClassification.from_pretrained(pred).eval()
    calls, wanted, soft, loss = [], [], distill.soft_target_loss, distill.Distiller.loss

    def recording(student, teacher, temperature, is_regression):
        out = soft(student, teacher, temperature, is_regression)
        calls.append({"student": student.detach().float(), "teacher": teacher.detach().float(),
                      "regression": is_regression, "soft": float(out.detach())})
        return out

    def with_the_predecessor(self, task, student_logits, batch):
        with torch.no_grad():
            wanted.append(own(**{k: v for k, v in batch.items() if k != "labels"}).logits.float())
        return loss(self, task, student_logits, batch)

    monkeypatch.setattr(distill, "soft_target_loss", recording)
    monkeypatch.setattr(distill.Distiller, "loss", with_the_predecessor)
    flags = {"compress": ["--successor-layers", "2", "--steps-to-full", "3", "--unfreeze-head"],
             "finetune": ["--keep-layers", "2"]}[command]
    run = [command, "--model", str(pred), *args, *flags, "--lr", "1e-3", "--max-steps", "8", "--eval-steps", "4",
           "--log-steps", "1"]
    r = CliRunner().invoke(cli, [*run, "--output", str(tmp_path / "kd"), "--distill-alpha", "0.5"])
    assert r.exit_code == 0, r.output
    assert calls and len(calls) == len(wanted)
    for c, want in zip(calls, wanted):
        assert c["regression"] is True and c["student"].shape == c["teacher"].shape == (len(want), 1)
        torch.testing.assert_close(c["teacher"], want, rtol=1e-5, atol=1e-6)
        assert c["soft"] == pytest.approx(float(((c["student"] - want) ** 2).mean()), rel=1e-5, abs=1e-9)
    m = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    assert m["distill"]["alpha"] == 0.5 and m["distill"]["temperature"] == 1.0
    assert set(m["loyalty"]) == {"pearson"} and -1 <= m["loyalty"]["pearson"] <= 1
    assert "pearson" in m["dev"]  # a regression metric, not accuracy
    log = [json.loads(x) for x in (tmp_path / "kd" / "train_log.jsonl").read_text().splitlines()]
    # --log-steps 1: a line per step; steps with a loss are the trained ones, each its own term
    assert [h["soft_loss"] for h in log if h.get("loss") is not None] == pytest.approx([c["soft"] for c in calls],
                                                                                       rel=1e-5)
    calls.clear()
    r = CliRunner().invoke(cli, [*run, "--output", str(tmp_path / "plain")])
    assert r.exit_code == 0 and not calls, r.output  # no KD: no soft-target term at all
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "kd").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").state_dict()
    assert not same(a, b)
    # the dev rows batched as the run's evaluation batched them (--eval-batch-size, default 64: one batch of
    # 48), so both pad alike: with batches of 16 an AMD EPYC (avx512) gave a Pearson 1.5e-4 off (-0.91073 vs
    # -0.91058), the 48 predictions of the tiny model spreading little
    i = dev_args.index("--batch-size")
    ev = CliRunner().invoke(cli, ["evaluate", "--model", str(tmp_path / "kd"), "--reference", str(pred),
                                  *dev_args[:i], *dev_args[i + 2:], "--batch-size", "64", "--json"])
    assert ev.exit_code == 0, ev.output
    e = json.loads(ev.output[ev.output.index("{"):])
    assert e["loyalty"]["pearson"] == pytest.approx(m["loyalty"]["pearson"], abs=1e-5)
