"""The bad-input guarantee for real processes (`python -m theseus_deploy ...`), not click's CliRunner:
what libraries print to the real stderr (transformers' load report, warnings, tqdm bars) counts.

Every case of tests/test_bad_input.py plus one per class of failure found by running them as real
processes (tracebacks, transformers' load report, a progress bar glued to the error line, a refused run
that still wrote or left files), each in its own process, in parallel: exit 2; the last stderr line starts with `error:` and names the problem; besides
progress bars (and, for failures during work, the run's own `[command]` log lines) that is the only
line; no traceback; the tree unchanged (every file's bytes and mtime, every folder and link, before
and after: nothing added, removed or modified).

Cost: each process imports torch and transformers (the flags of finetune/compress/evaluate are
checked before that import, so those cases take ~1 s). Measured on this project's shared 2-core
machine under load: 43 + 24 cases, 4-6 at a time, 7-10 minutes; not the ~90 s first planned.
"""
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_bad_input import CASES as INPROC_CASES
from test_bad_input import _argv, env  # noqa: F401  (env: the module's tiny models and data, built once)
from tiny import tiny_config

# (id, argv template, message, failure during work); templates as in test_bad_input, plus
# {tmp} (the case's own folder) and "" tokens given as the list form.
NEW_CASES = [
    # transformers' load report (22-58 lines before the error) is covered by the renamed-weights cases above
    ("diverged-not-glued", "finetune --model {M:base} {toy} --output {out} --lr 1e30 --max-steps 6 --batch-size 8 "
     "--max-seq-length 16 --log-steps 1", "training diverged", True),
    ("label-nan", "finetune --model {M:base} {toy:nan.csv} --output {out}", "is not a finite number", False),
    ("label-bool-mixed", "finetune --model {M:base} {toy:boolmix.jsonl} --output {out}", "mix booleans", False),
    ("csv-extra-fields-missing-column", "finetune --model {M:base} {toy:extra.csv} --output {out}",
     "more fields than the header", False),
    ("json-deep", "finetune --model {M:base} {toy:deep.json} --output {out}", "nested too deeply", False),
    ("tokenizer-not-a-tokenizer", "evaluate --model {M:badtok} {toy}", "could not load a tokenizer", False),
    ("tokenizer-no-pad", "finetune --model {M:nopad} {toy} --output {out}", "has no pad token", False),
    ("t5-export", "export --model {M:t5} --format onnx --output {out}", "is an encoder-decoder (t5)", False),
    ("t5-evaluate", "evaluate --model {M:t5} {toy}", "is an encoder-decoder (t5)", False),
    ("t5-bench", "bench --model {M:t5} --batch-sizes 1 --seq-lens 8 --output {out}", "is an encoder-decoder", False),
    ("vocab-below-tokenizer", "export --model {M:smallvocab} --format onnx --output {out} --max-seq-length 32",
     "would index past the embedding table", False),
    ("output-name-too-long", "export --model {M:base} --format onnx --output {tmp}/" + "x" * 250, "too long", False),
    ("output-under-proc", "export --model {M:base} --format onnx --output /proc/theseus-out", "pseudo file system",
     False),
    ("output-under-sys", "evaluate --model {M:base} {toy} --output /sys/theseus.json", "pseudo file system", False),
    ("output-empty", ["export", "--model", "{M:base}", "--format", "onnx", "--output", ""], "--output is empty", False),
    ("bench-check-bad-baseline", "bench --model {M:base} --batch-sizes 1 --seq-lens 8 --output {out} "
     "--check {d}/list-baseline.json", "neither 'ratios' nor 'speedups'", False),
    ("bench-check-too-few-rounds", "bench --model {M:base} --batch-sizes 1 --seq-lens 8 --output {out} --rounds 4 "
     "--check {d}/baseline.json", "--check needs --rounds 5 or more (got 4)", False),
    ("bench-baseline-into-model", "bench --model {M:base} --batch-sizes 1 --seq-lens 8 --output {out} "
     "--update-baseline {M:base}/config.json", "lies inside the model folder", False),
    ("bench-baseline-is-a-folder", "bench --model {M:base} --batch-sizes 1 --seq-lens 8 --output {out} "
     "--update-baseline {d}/a-folder", "is a folder", False),
    ("seed-beyond-64-bits", "finetune --model {M:base} {toy} --output {out} --seed 18446744073709551616",
     "--seed must be", False),
    ("export-seq-above-positions", "export --model {M:base} --format onnx --output {out} --max-seq-length 600",
     "exceeds the model's position limit", False),
    ("disk-full-compress-checkpoint", "compress --model {M:base} {toy} --output {out} --max-steps 4 --save-steps 1 "
     "--eval-steps 2 --batch-size 8 --max-seq-length 16 [diskfull]", "no space left on device", True),
]
CASES = [(i, t, m, False) for i, t, m in INPROC_CASES] + NEW_CASES

# A tqdm bar's segments (`train:  50%|#####     | 3/6 [00:01<00:01, 2.9it/s]`), between \r and \n.
BAR = re.compile(r"^\s*[\w .\-]*:\s*\d+%\|.*\|.*\d+/\d+.*\]\s*$")

# Makes the checkpoint writer (recipes/loop.py) write into /dev/full: torch's writer then fails as on a
# full disk (`RuntimeError ... unexpected pos` with the ENOSPC in its context).
DISK_FULL_SITE = '''
import os, tempfile
_mkstemp = tempfile.mkstemp
def mkstemp(*a, **k):
    if str(k.get("prefix", "")).startswith(".checkpoint.pt."):
        return os.open("/dev/full", os.O_WRONLY), os.path.join(str(k["dir"]), ".checkpoint.pt.never-written")
    return _mkstemp(*a, **k)
tempfile.mkstemp = mkstemp
'''


def _snapshot(root: Path) -> dict:
    """Every entry under root: files by content hash and mtime, links by target, folders by name."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                st = p.stat()
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_mode)
    return out


def _write_inputs(env):
    """The models and files of the new classes, beside test_bad_input's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, T5Config

    d, base = env["d"], env["models"]["base"]
    models = env["models"]
    if "badtok" in models:
        return
    rows = [(t, y) for t, y in zip(("a great movie", "a dull film", "great fun", "dull plot") * 8, (1, 0, 1, 0) * 8)]
    (d / "nan.csv").write_text("text,label\n" + "".join(f"{t},{'nan' if i == 5 else y}\n" for i, (t, y) in enumerate(rows)))
    (d / "boolmix.jsonl").write_text("".join(json.dumps({"text": t, "label": (y == 1) if i % 3 else y}) + "\n"
                                             for i, (t, y) in enumerate(rows)))
    (d / "extra.csv").write_text("text,y\n" + "".join(f"{t},{y},extra\n" for t, y in rows))
    (d / "deep.json").write_text("[" * 200000 + "]" * 200000)
    (d / "list-baseline.json").write_text("[1, 2]")
    (d / "baseline.json").write_text('{"ratios": {"depth successor/torch b1/s8": 1.5}}')
    (d / "a-folder").mkdir()

    def copy(name):
        shutil.copytree(base, d / name)
        models[name] = d / name
        return d / name

    bad = copy("badtok")
    (bad / "tokenizer.json").write_text(json.dumps({"hello": "this parses as JSON but is no tokenizer"}))
    for f in bad.iterdir():
        if f.name.startswith("vocab"):
            f.unlink()
    nopad = copy("nopad")
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = None
    for f in nopad.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            f.unlink()
    tok.save_pretrained(nopad)
    assert AutoTokenizer.from_pretrained(nopad).pad_token is None
    import torch

    torch.manual_seed(0)
    t5 = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, num_labels=2,
                  decoder_start_token_id=0, pad_token_id=0)
    AutoModelForSequenceClassification.from_config(t5).save_pretrained(d / "t5")
    tok.save_pretrained(d / "t5")
    models["t5"] = d / "t5"
    small = tiny_config("bert", 2)
    small.vocab_size = len(tok) // 2  # half the tokenizer's ids (30522 for bert-base's, 266 for the built-in one)
    AutoModelForSequenceClassification.from_config(small).save_pretrained(d / "smallvocab")
    AutoTokenizer.from_pretrained(base).save_pretrained(d / "smallvocab")
    models["smallvocab"] = d / "smallvocab"


def _expand(template, env, out: Path, tmp: Path) -> tuple[list, bool]:
    tokens = template if isinstance(template, list) else template.split()
    disk_full = "[diskfull]" in tokens
    tokens = [t for t in tokens if t != "[diskfull]"]
    argv = []
    for tok in tokens:
        if tok.startswith("{toy:"):
            argv += _toy_file(env, tok[5:-1])
        else:
            argv += _argv(tok.replace("{tmp}", str(tmp)), env, out) if tok else [""]
    return argv, disk_full


def _toy_file(env, name):
    d = env["d"]
    return ["--task", "custom", "--train-file", str(d / name), "--validation-file", str(d / "dev.csv"),
            "--text-columns", "text", "--label-column", "label"]


def _run(case, env, root: Path, site: Path) -> str | None:
    """Run one case in a real process; None when every promise held, else what broke."""
    name, template, msg, after_work = case
    tmp = root / name
    tmp.mkdir()
    out = tmp / "out"
    before = _snapshot(tmp)
    argv, disk_full = _expand(template, env, out, tmp)
    penv = {**os.environ, "PYTHONPATH": os.pathsep.join(([str(site)] if disk_full else []) + [str(REPO)])}
    r = subprocess.run([sys.executable, "-m", "theseus_deploy", *argv], capture_output=True, text=True, env=penv,
                       timeout=600, cwd=tmp)
    err = r.stderr
    lines = [ln for ln in err.split("\n") if ln.strip()]
    segments = [s for ln in err.split("\n") for s in ln.split("\r") if s.strip() and not BAR.match(s)]
    if after_work:
        segments = [s for s in segments if not re.match(r"^\[(finetune|compress)\] ", s)]
    problems = []
    if r.returncode != 2:
        problems.append(f"exit {r.returncode}")
    if not lines or not lines[-1].startswith("error: "):
        problems.append(f"last line is not an error: {lines[-1][:200] if lines else '(none)'!r}")
    elif msg not in lines[-1]:
        problems.append(f"{msg!r} not in {lines[-1][:300]!r}")
    if len(segments) > 1:
        problems.append(f"{len(segments) - 1} more lines than the error: {segments[0][:200]!r}")
    if "Traceback" in err or "Traceback" in r.stdout:
        problems.append("traceback")
    after = _snapshot(tmp)
    if after != before:
        changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
        problems.append(f"the tree changed: {changed[:5]}")
    return f"{name}: {'; '.join(problems)}\n---\n{err[-1500:]}" if problems else None


@pytest.mark.slow  # 67 processes, each importing torch: minutes on 2 busy cores (see the module docstring)
def test_bad_input_in_real_processes(env, tmp_path):  # noqa: F811
    _write_inputs(env)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(DISK_FULL_SITE)
    root = tmp_path / "cases"
    root.mkdir()
    shared_before = _snapshot(env["d"])
    # Cases that write (or lock) inside the shared folder run one after another: two of them at once
    # would meet each other's output lock instead of their own mistake.
    shared = [c for c in CASES if re.search(r"--(output|update-baseline) \{(M:|d|glue:)", " ".join(c[1]) if isinstance(c[1], list)
                                            else c[1])]
    alone = [c for c in CASES if c not in shared]

    def serial():
        return [_run(c, env, root, site) for c in shared]

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        chain = pool.submit(serial)
        results = list(pool.map(lambda c: _run(c, env, root, site), alone)) + chain.result()
    failures = [r for r in results if r]
    assert _snapshot(env["d"]) == shared_before, "the models or data changed"
    assert not failures, f"{len(failures)} of {len(CASES)} cases broke a promise:\n\n" + "\n\n".join(failures)


def test_overwriting_a_symlinked_output_leaves_no_stray_link(env, tmp_path):  # noqa: F811
    """`export --output LINK --overwrite`: LINK becomes the new folder, what it pointed to is left
    alone, and no `.LINK.old-PID` remains beside it."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine.txt").write_text("kept")
    (tmp_path / "link").symlink_to(target)
    penv = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "theseus_deploy", "export", "--model", str(env["models"]["base"]),
                        "--format", "onnx", "--output", str(tmp_path / "link"), "--overwrite", "--max-seq-length", "32"],
                       capture_output=True, text=True, env=penv, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
    assert (tmp_path / "link").is_dir() and not (tmp_path / "link").is_symlink()
    assert (target / "mine.txt").read_text() == "kept"


def test_output_inside_the_default_data_folder_is_refused(env, tmp_path):  # noqa: F811
    """No --data-dir: the GLUE folder read is $THESEUS_DATA_DIR's, and an output inside it is refused as with
    --data-dir (it replaced SST-2/dev.tsv with the metrics JSON, exit 0)."""
    data = tmp_path / "glue"
    shutil.copytree(env["glue"]["good"], data)
    before = _snapshot(tmp_path)
    penv = {**os.environ, "PYTHONPATH": str(REPO), "THESEUS_DATA_DIR": str(data)}
    r = subprocess.run([sys.executable, "-m", "theseus_deploy", "evaluate", "--model", str(env["models"]["base"]),
                        "--task", "sst2", "--output", str(data / "SST-2" / "dev.tsv"), "--overwrite"],
                       capture_output=True, text=True, env=penv, timeout=600, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "lies inside the input folder" in lines[0], r.stderr[-2000:]
    assert _snapshot(tmp_path) == before
