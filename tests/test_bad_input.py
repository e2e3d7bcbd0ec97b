"""Hostile but realistic input to every command: one `error:` line, exit 2, no traceback, nothing new
on disk, the source model unchanged. Plus the guarantees behind it: output locks, stale temp
folders, umask, manifest confinement and hashes, strict JSON, a full disk."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from theseus_deploy.config import ExportConfig
from click.testing import CliRunner

from conftest import REPO, make_tiny_model
from theseus_deploy.cli import cli
from theseus_deploy.errors import UsageError

WORDS = "the a movie film plot actor scene story music ending time people way thing day".split()


def _rows(n, single=False):
    import random

    rng = random.Random(n)
    out = []
    for i in range(n):
        words = rng.choices(WORDS, k=5)
        label = 1 if single else i % 2
        if label:
            words.insert(2, "great")
        out.append((" ".join(words), label))
    return out


def _tree(root: Path) -> dict:
    """Every path under root (files with a content hash): the before/after picture of the disk."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir"
    return out


def _dir_times(root: Path) -> dict:
    """The mtime of root and of every folder below it: a file made and removed again (a lock file)
    leaves the tree as it was but not its folder's mtime."""
    return {str(p): p.stat().st_mtime_ns for p in [root, *sorted(root.rglob("*"))] if p.is_dir()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("bad")
    base = make_tiny_model(d / "base", "bert", 4)
    models = {"base": base, "roberta": make_tiny_model(d / "roberta", "roberta", 2)}
    sd = load_file(base / "model.safetensors")

    def variant(name, weights=None, raw=None, drop_tokenizer=False):
        path = d / name
        shutil.copytree(base, path)
        if weights is not None:
            save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        if raw is not None:
            (path / "model.safetensors").write_bytes(raw)
        if drop_tokenizer:
            for f in path.iterdir():
                if f.name != "config.json" and f.suffix != ".safetensors":
                    f.unlink()
        models[name] = path

    variant("notok", drop_tokenizer=True)
    variant("renamed", weights={"x." + k: v for k, v in sd.items()})
    nan = dict(sd)
    key = next(k for k in nan if "encoder.layer.1" in k and k.endswith("weight"))
    nan[key] = nan[key].clone()
    nan[key].view(-1)[0] = float("nan")
    variant("nanw", weights=nan)
    data = (base / "model.safetensors").read_bytes()
    variant("trunc", raw=data[: len(data) // 2])
    variant("garbled", raw=b"\x00garbage" * 64)
    from transformers import BertModel

    from tiny import tiny_config, tiny_tokenizer

    BertModel(tiny_config("bert", 2)).save_pretrained(d / "bare")  # an encoder without a classifier head
    tiny_tokenizer().save_pretrained(d / "bare")
    models["bare"] = d / "bare"

    csv = lambda rows: "text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)  # noqa: E731
    (d / "train.csv").write_text(csv(_rows(64)))
    (d / "dev.csv").write_text(csv(_rows(32)))
    (d / "single.csv").write_text(csv(_rows(64, single=True)))
    tsv = lambda rows: "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows)  # noqa: E731
    glue = {}
    for name, train, dev in [("good", tsv(_rows(64)), tsv(_rows(32))),
                             ("single", tsv(_rows(64, single=True)), tsv(_rows(32))),
                             ("nolabel", tsv(_rows(64)), "sentence\tlabel\n" + "".join(
                                 f"{t}\t{y}\n" if i % 2 else f"{t}\n" for i, (t, y) in enumerate(_rows(32))))]:
        (d / f"glue-{name}" / "SST-2").mkdir(parents=True)
        (d / f"glue-{name}" / "SST-2" / "train.tsv").write_text(train)
        (d / f"glue-{name}" / "SST-2" / "dev.tsv").write_text(dev)
        glue[name] = d / f"glue-{name}"
    (d / "glue-latin1" / "SST-2").mkdir(parents=True)
    (d / "glue-latin1" / "SST-2" / "train.tsv").write_bytes(tsv(_rows(64)).encode() + "caf\xe9 cr\xe8me\t1\n".encode("latin-1"))
    (d / "glue-latin1" / "SST-2" / "dev.tsv").write_bytes(tsv(_rows(32)).encode())
    glue["latin1"] = d / "glue-latin1"
    return {"d": d, "models": models, "glue": glue}


def _toy(env, train="train.csv"):
    d = env["d"]
    return ["--task", "custom", "--train-file", str(d / train), "--validation-file", str(d / "dev.csv"),
            "--text-columns", "text", "--label-column", "label"]


QUICK = ["--max-steps", "2", "--batch-size", "8", "--max-seq-length", "16"]

# (id, command line); {M:name} is a model folder, {toy}/{single} custom data, {glue:name} a GLUE folder,
# {out} the output folder. Each must give exit 2, one `error:` line containing `msg`.
CASES = [
    ("lr-nan", "finetune --model {M:base} {toy} --output {out} --lr nan", "--lr must be a finite number"),
    ("lr-negative", "compress --model {M:base} {toy} --output {out} --lr -1", "--lr must be greater than 0"),
    ("k-inf", "compress --model {M:base} {toy} --output {out} --k inf", "--k must be a finite number"),
    ("warmup-2", "finetune --model {M:base} {toy} --output {out} --warmup-ratio 2", "--warmup-ratio must be"),
    ("epochs-nan", "finetune --model {M:base} {toy} --output {out} --epochs nan", "--epochs must be a finite"),
    ("seq-negative", "finetune --model {M:base} {toy} --output {out} --max-seq-length -5", "--max-seq-length must be"),
    ("eval-samples-neg", "evaluate --model {M:base} {toy} --max-eval-samples -1 --output {out}/m.json",
     "--max-eval-samples must be at least 1"),
    ("eval-batch-0", "evaluate --model {M:base} {toy} --batch-size 0", "--batch-size must be at least 1"),
    ("task-drop-nan", "export --model {M:base} --format onnx --output {out} --max-task-drop nan", "--max-task-drop must be"),
    ("min-loyalty-range", "export --model {M:base} --format onnx --output {out} --min-loyalty 1.5", "--min-loyalty must be"),
    # a loyalty limit is measured on --task's dev set by the validation: without either it would check nothing
    ("min-loyalty-no-task", "export --model {M:base} --format onnx --output {out} --min-loyalty 0.9",
     "--min-loyalty needs --task"),
    ("min-loyalty-no-validate", "export --model {M:base} --format onnx --output {out} --task sst2 --data-dir "
     "{glue:single} --no-validate --min-loyalty 0.9", "--min-loyalty needs the validation"),
    ("format-nonsense", "export --model {M:base} --format nonsense --output {out}", "nonsense"),
    ("opset-99", "export --model {M:base} --format onnx --output {out} --opset 99", "--opset 99 is above"),
    ("bench-threads", "bench --model {M:base} --output {out} --threads -3", "--threads must be at least 1"),
    ("no-tokenizer-ft", "finetune --model {M:notok} {toy} --output {out}", "no tokenizer files"),
    ("no-tokenizer-ev", "evaluate --model {M:notok} {toy} --output {out}/m.json", "no tokenizer files"),
    ("no-tokenizer-ex", "export --model {M:notok} --format onnx --output {out}", "no tokenizer files"),
    ("renamed-weights-c", "compress --model {M:renamed} {toy} --output {out}", "does not match its config.json"),
    ("renamed-weights-e", "evaluate --model {M:renamed} {toy}", "does not match its config.json"),
    ("renamed-weights-x", "export --model {M:renamed} --format onnx --output {out}", "does not match its config.json"),
    ("nan-weights-f", "finetune --model {M:nanw} {toy} --output {out}", "non-finite weights"),
    ("nan-weights-x", "export --model {M:nanw} --format onnx --output {out}", "non-finite weights"),
    ("nan-weights-b", "bench --model {M:nanw} --batch-sizes 1 --seq-lens 8 --output {out}", "non-finite weights"),
    ("truncated-c", "compress --model {M:trunc} {toy} --output {out}", "could not load model"),
    ("truncated-e", "evaluate --model {M:trunc} {toy}", "could not load model"),
    ("truncated-x", "export --model {M:trunc} --format onnx --output {out}", "could not load model"),
    ("truncated-b", "bench --model {M:trunc} --batch-sizes 1 --seq-lens 8 --output {out}", "could not load model"),
    ("garbled-f", "finetune --model {M:garbled} {toy} --output {out}", "could not load model"),
    ("single-class-custom", "finetune --model {M:base} {single} --output {out}", "nothing to learn"),
    ("single-class-glue", "finetune --model {M:base} --task sst2 --data-dir {glue:single} --output {out}",
     "nothing to learn"),
    ("glue-no-label-ev", "evaluate --model {M:base} --task sst2 --data-dir {glue:nolabel} --output {out}/m.json",
     "16 of 32 rows have no label column"),
    ("glue-no-label-c", "compress --model {M:base} --task sst2 --data-dir {glue:nolabel} --output {out}",
     "have no label column"),
    ("glue-latin1", "finetune --model {M:base} --task sst2 --data-dir {glue:latin1} --output {out}", "is not UTF-8"),
    ("seq-above-positions", "finetune --model {M:base} {toy} --output {out} --max-seq-length 600",
     "exceeds the model's position limit (514"),
    ("seq-roberta-offset", "compress --model {M:roberta} {toy} --output {out} --max-seq-length 514",
     "position limit (513 tokens)"),
    ("seq-roberta-eval", "evaluate --model {M:roberta} {toy} --max-seq-length 514", "position limit (513"),
    ("successor-equal", "compress --model {M:base} {toy} --output {out} --successor-layers 4", "between 1 and 3"),
    ("successor-above", "compress --model {M:base} {toy} --output {out} --successor-layers 5", "between 1 and 3"),
    ("out-is-model-ft", "finetune --model {M:base} {toy} --output {M:base} --overwrite", "would replace"),
    ("out-is-model-c", "compress --model {M:base} {toy} --output {M:base} --overwrite --resume", "would replace"),
    ("out-is-model-x", "export --model {M:base} --format onnx --output {M:base} --overwrite", "would replace"),
    ("out-is-model-b", "bench --model {M:base} --output {M:base} --overwrite", "would replace"),
    ("out-parent-of-model", "export --model {M:base} --format onnx --output {M:base}/.. --overwrite", "lies inside it"),
    ("out-contains-data", "finetune --model {M:base} {toy} --output {d} --overwrite", "would replace"),
    # an output inside the data folder replaced the data: `export --task sst2 --data-dir G --output G/SST-2
    # --overwrite` deleted SST-2's train.tsv and dev.tsv, `evaluate --output G/SST-2/dev.tsv --overwrite` its dev set
    ("out-inside-data-x", "export --model {M:base} --format onnx --max-seq-length 16 --task sst2 --data-dir {glue:good} "
     "--output {glue:good}/SST-2 --overwrite", "lies inside the input folder"),
    ("out-inside-data-ev", "evaluate --model {M:base} --task sst2 --data-dir {glue:good} "
     "--output {glue:good}/SST-2/dev.tsv --overwrite", "lies inside the input folder"),
    # bench's --output holds a config.json (so it read as "the model folder"), and a baseline inside it was
    # accepted while that folder did not exist yet, then deleted by the next `--overwrite`
    ("baseline-inside-bench-out", "bench --model {M:base} --batch-sizes 1 --seq-lens 8 --output {out} "
     "--update-baseline {out}/baseline.json", "the --output folder, which --overwrite replaces whole"),
    ("eval-out-is-model", "evaluate --model {M:base} {toy} --output {M:base}", "would replace"),
    # a bare encoder loads with a new random head: evaluate scored it (0.58 on MRPC), export failed its own
    # validation (two different random heads), bench timed it and sweep scored it as the predecessor
    ("bare-encoder-ev", "evaluate --model {M:bare} {toy} --output {out}/m.json",
     "is not a fine-tuned classifier (architectures: BertModel): evaluate scores"),
    ("bare-encoder-x", "export --model {M:bare} --format onnx --output {out}",
     "is not a fine-tuned classifier (architectures: BertModel): export builds a classifier's graph"),
    ("bare-encoder-b", "bench --model {M:bare} --batch-sizes 1 --seq-lens 8 --output {out}",
     "or give --layers N to time random weights"),
    ("sweep-temperature-no-alpha", "sweep --model {M:base} {toy} --output {out} --distill-temperature 2",
     "--distill-temperature 2 needs --distill-alpha above 0"),
    ("bare-encoder-sweep", "sweep --model {M:bare} {toy} --output {out} --depths 2 --backends torch",
     "is not a fine-tuned classifier (architectures: BertModel): sweep compresses"),
]


def _argv(template: str, env, out: Path) -> list[str]:
    argv = []
    for tok in template.split():
        if tok == "{toy}":
            argv += _toy(env)
        elif tok == "{single}":
            argv += _toy(env, "single.csv")
        elif tok.startswith("{M:"):
            name, _, rest = tok[3:].partition("}")
            argv.append(str(env["models"][name]) + rest)
        elif tok.startswith("{glue:"):
            name, _, rest = tok[6:].partition("}")
            argv.append(str(env["glue"][name]) + rest)
        else:
            argv.append(tok.replace("{out}", str(out)).replace("{d}", str(env["d"])))
    return argv


def _check_one_error(r, msg, after_work=False):
    """Exit 2 and one `error:` line; bad input fails before any work, so stderr holds nothing else
    (`after_work`: a failure while writing; the progress log comes first, the error line last)."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    err = r.stderr.strip().splitlines()
    if after_work:
        assert [e for e in err if e.startswith("error: ")] == err[-1:], r.stderr
        err = err[-1:]
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    assert msg in err[0], err[0]
    assert "Traceback" not in r.output


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(case, env, tmp_path):
    _, template, msg = case
    out = tmp_path / "out"
    models_before = {n: _tree(p) for n, p in env["models"].items()}
    data_before = _tree(env["d"])
    tree_before = _tree(tmp_path)
    inputs = [env["d"], *env["models"].values(), *env["glue"].values()]
    times_before = [_dir_times(p) for p in inputs]
    r = CliRunner().invoke(cli, _argv(template, env, out))
    _check_one_error(r, msg)
    assert _tree(tmp_path) == tree_before  # nothing new beside the output: no folder, temp dir or lock file
    assert _tree(env["d"]) == data_before and {n: _tree(p) for n, p in env["models"].items()} == models_before
    # not even for a moment: an output refused for lying inside the model (or data) folder made its
    # lock file there first, then removed it
    assert [_dir_times(p) for p in inputs] == times_before


def test_output_dot_is_refused_cleanly(env, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = CliRunner().invoke(cli, ["export", "--model", str(env["models"]["base"]), "--format", "onnx",
                                 "--output", ".", "--overwrite"])
    _check_one_error(r, "would replace the current folder")
    assert _tree(tmp_path) == {"work": "dir"}


def test_compress_resume_onto_a_non_empty_output_keeps_it(env, tmp_path):
    out = tmp_path / "out"
    from theseus_deploy.config import CompressConfig
    from theseus_deploy.recipes.compress import CompressRecipe

    args = dict(zip([a.lstrip("-").replace("-", "_") for a in _toy(env)[::2]], _toy(env)[1::2]))
    part = CompressRecipe(CompressConfig(model=str(env["models"]["base"]), output=str(out), max_steps=4, eval_steps=2,
                                         batch_size=8, max_seq_length=16, **args))
    part.cfg.stop_after_steps = 2
    part.setup().train()
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    before = _tree(tmp_path)
    r = CliRunner().invoke(cli, ["compress", "--model", str(env["models"]["base"]), *_toy(env), "--output", str(out),
                                 "--max-steps", "4", "--eval-steps", "2", "--batch-size", "8", "--max-seq-length", "16",
                                 "--resume"])
    _check_one_error(r, "output folder is not empty")
    assert _tree(tmp_path) == before and (out / "mine.txt").read_text() == "user data"


def test_evaluate_output_same_rules(env, tmp_path):
    base = ["evaluate", "--model", str(env["models"]["base"]), *_toy(env), "--max-seq-length", "16"]
    (tmp_path / "folder").mkdir()
    _check_one_error(CliRunner().invoke(cli, [*base, "--output", str(tmp_path / "folder")]), "is a folder")
    (tmp_path / "m.json").write_text("{}")
    _check_one_error(CliRunner().invoke(cli, [*base, "--output", str(tmp_path / "m.json")]), "output file exists")
    assert (tmp_path / "m.json").read_text() == "{}"
    r = CliRunner().invoke(cli, [*base, "--output", str(tmp_path / "m.json"), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["num_examples"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "m.json"]  # no temp or lock file left


# ------------------------------------------------------------------ disk full
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["finetune", "evaluate", "export", "bench"])
def test_disk_full_is_one_error_and_nothing_half_written(command, env, tmp_path, monkeypatch):
    import theseus_deploy.io as io

    monkeypatch.setattr(io, "atomic_write_text", _disk_full)  # under every write_json, wherever it is imported
    out = tmp_path / "out"
    m = str(env["models"]["base"])
    argv = {"finetune": ["finetune", "--model", m, *_toy(env), "--output", str(out), *QUICK],
            "evaluate": ["evaluate", "--model", m, *_toy(env), "--max-seq-length", "16", "--output", str(out)],
            "export": ["export", "--model", m, "--format", "onnx", "--output", str(out), "--max-seq-length", "32"],
            "bench": ["bench", "--model", m, "--batch-sizes", "1", "--seq-lens", "8", "--rounds", "1", "--iterations", "1",
                      "--min-seconds", "0", "--warmup", "0", "--output", str(out)]}[command]
    r = CliRunner().invoke(cli, argv)
    _check_one_error(r, "no space left on device", after_work=True)
    left = {p.name for p in tmp_path.iterdir()}
    # finetune keeps its best weights in out.partial/ (what a resumed run starts from); nothing else remains
    assert left <= {"out.partial"} and not out.exists(), left


def test_disk_full_inside_a_library_writer(env, tmp_path, monkeypatch):
    """torch.save / safetensors report a full disk in their own exception types: still one line."""
    from transformers import PreTrainedModel

    def full(*a, **k):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["finetune", "--model", str(env["models"]["base"]), *_toy(env), "--output", str(out),
                                 *QUICK])
    _check_one_error(r, "no space left on device", after_work=True)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------ locks, stale temp folders, umask
def _hold_lock(path: Path) -> subprocess.Popen:
    code = ("import sys, time; from theseus_deploy.io import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_live_run_is_refused_and_a_killed_one_releases(env, tmp_path):
    out = tmp_path / "out"
    m = str(env["models"]["base"])
    holder = _hold_lock(out)
    try:
        for argv in (["finetune", "--model", m, *_toy(env), "--output", str(out), *QUICK],
                     ["compress", "--model", m, *_toy(env), "--output", str(out), *QUICK],
                     ["compress", "--model", m, *_toy(env), "--output", str(out), *QUICK, "--resume"],
                     ["evaluate", "--model", m, *_toy(env), "--output", str(out)],
                     ["export", "--model", m, "--format", "onnx", "--output", str(out)],
                     ["bench", "--model", m, "--output", str(out)]):
            r = CliRunner().invoke(cli, argv)
            _check_one_error(r, f"another run is writing {out} (pid {holder.pid})")
        assert not out.exists() and not (tmp_path / "out.partial").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 released the lock: the next run proceeds (and removes the lock file when done)
    r = CliRunner().invoke(cli, ["export", "--model", m, "--format", "onnx", "--output", str(out),
                                 "--max-seq-length", "32"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_cli_processes_on_one_output(env, tmp_path):
    """Two real `theseus-deploy` processes: while the first holds the output, the second is refused."""
    out = tmp_path / "out"
    m = str(env["models"]["base"])
    penv = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "theseus_deploy", "compress", "--model", m, *_toy(env),
                              "--output", str(out), "--max-steps", "100000", "--batch-size", "8", "--max-seq-length", "16"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=penv)
    try:
        for line in first.stderr:  # wait until it trains: the lock is held from the start of the run
            if "train" in line and "steps" in line:
                break
        second = subprocess.run([sys.executable, "-m", "theseus_deploy", "export", "--model", m, "--format", "onnx",
                                 "--output", str(out)], capture_output=True, text=True, env=penv, timeout=120)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: another run is writing {out}"), second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_stale_temp_folders_of_this_output_are_cleaned(env, tmp_path):
    out = tmp_path / "out"
    for name in (".out.tmp-abc123", ".out.old-999", ".other.tmp-xyz"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_text("left by a killed run")
    (tmp_path / ".out.tmp-file").write_text("a killed atomic_write_text")
    r = CliRunner().invoke(cli, ["export", "--model", str(env["models"]["base"]), "--format", "onnx",
                                 "--output", str(out), "--max-seq-length", "32"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-xyz", "out"]  # another output's: untouched


def test_outputs_follow_the_umask(env, tmp_path):
    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(cli, ["finetune", "--model", str(env["models"]["base"]), *_toy(env),
                                     "--output", str(tmp_path / "ft"), *QUICK])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(cli, ["evaluate", "--model", str(tmp_path / "ft"), *_toy(env), "--max-seq-length", "16",
                                     "--output", str(tmp_path / "m.json")])
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    assert (tmp_path / "ft").stat().st_mode & 0o777 == 0o755
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "ft").iterdir()} == \
        {p.name: "0o644" for p in (tmp_path / "ft").iterdir()}
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ manifest confinement and hashes
@pytest.fixture(scope="module")
def exported(env, tmp_path_factory):
    from theseus_deploy.export.api import export_model

    out = tmp_path_factory.mktemp("exp") / "e"
    export_model(ExportConfig.of(model=str(env["models"]["base"]), formats=["onnx"], output=str(out),
                                 max_seq_length=32))
    return out


def _edit_manifest(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["artifacts"][0].update(changes)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_manifest_file_outside_the_folder_is_refused(exported, tmp_path):
    from theseus_deploy.runtime import TextClassifier, load_runner

    (tmp_path / "outside").mkdir()
    shutil.copy(exported / "model.onnx", tmp_path / "outside" / "model.onnx")
    cases = {"dotdot": "../outside/model.onnx", "absolute": "/etc/passwd", "link": "link.onnx"}
    for name, file in cases.items():
        folder = _edit_manifest(exported, tmp_path / name, file=file)
        if name == "link":
            (folder / "link.onnx").symlink_to(tmp_path / "outside" / "model.onnx")
        with pytest.raises(UsageError, match="outside the folder"):
            load_runner(str(folder), "onnx")
        with pytest.raises(UsageError, match="outside the folder"):
            TextClassifier.load(str(folder), backend="onnx")


def test_manifest_hash_is_verified(exported, tmp_path):
    from theseus_deploy.runtime import TextClassifier, load_runner

    folder = _edit_manifest(exported, tmp_path / "e", sha256="0" * 64)
    with pytest.raises(UsageError, match="sha256 does not match"):
        load_runner(str(folder), "onnx")
    with pytest.raises(UsageError, match="sha256 does not match"):
        TextClassifier.load(str(folder), backend="onnx")
    assert TextClassifier.load(str(folder), backend="onnx", verify_hash=False)("a great movie")[0]["label"]
    assert load_runner(str(exported), "onnx").logits(load_runner(str(exported), "onnx").make_inputs(1, 8)).shape == (1, 2)


def test_trt_ep_cache_stays_in_the_export_folder(exported, tmp_path):
    from theseus_deploy.runtime.ort import _trt_ep_options

    opts = _trt_ep_options(exported / "model.onnx", exported)
    assert Path(opts["trt_engine_cache_path"]) == exported.resolve() / "trt-ep-cache"
    folder = tmp_path / "e"
    shutil.copytree(exported, folder)
    (tmp_path / "elsewhere").mkdir()
    (folder / "trt-ep-cache").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="outside the export folder"):
        _trt_ep_options(folder / "model.onnx", folder)


# ------------------------------------------------------------------ strict JSON
def _strict(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_never_gets_nan(env, tmp_path):
    """A regression model on a dev set of equal scores: Pearson is NaN; files and --json say null."""
    reg = make_tiny_model(tmp_path / "reg", "bert", 2, num_labels=1)
    (tmp_path / "flat.csv").write_text("text,score\n" + "".join(f"{t},2.5\n" for t, _ in _rows(16)))
    argv = ["evaluate", "--model", str(reg), "--task", "custom", "--validation-file", str(tmp_path / "flat.csv"),
            "--text-columns", "text", "--label-column", "score", "--max-seq-length", "16"]
    r = CliRunner().invoke(cli, [*argv, "--output", str(tmp_path / "m.json"), "--json"])
    assert r.exit_code == 0, r.output
    saved = _strict((tmp_path / "m.json").read_text())
    assert saved["metrics"]["pearson"] is None
    assert _strict(r.stdout[r.stdout.index("{"):])["metrics"]["pearson"] is None


def test_write_json_and_dumps_are_strict(tmp_path):
    import numpy as np

    from theseus_deploy.io import dumps, write_json

    obj = {"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32("nan"), "d": {"e": -float("inf")}}
    write_json(tmp_path / "x.json", obj)
    assert _strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5], "c": None, "d": {"e": None}}
    assert _strict(dumps(obj))["b"] == [None, 1.5]


def test_constant_regression_scores_are_refused_for_training():
    import numpy as np

    from theseus_deploy.data import TaskData, TaskSpec, check_training_labels

    spec = TaskSpec("custom", metrics=("pearson", "spearman"))
    with pytest.raises(UsageError, match="have score 2.5: nothing to learn"):
        check_training_labels(TaskData(spec, "train", [("a", None)] * 3, np.full(3, 2.5, dtype=np.float32), "f.csv"))
    check_training_labels(TaskData(spec, "train", [("a", None)] * 2, np.asarray([1.0, 2.0], dtype=np.float32), "f.csv"))
