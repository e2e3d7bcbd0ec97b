"""scripts/results.py (docs/results.md): which runs it starts, and the report it writes from them.

The runs themselves take hours; here `sh` is replaced by a fake that writes each run's metrics.json,
so the orchestration (shared predecessor, skipping finished runs) and the arithmetic of the report
(medians over seeds, retention, wins) are checked on known numbers.
"""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def results():
    spec = importlib.util.spec_from_file_location("results_script", REPO / "scripts" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_sh(calls, scores):
    def sh(args, log):
        out = Path(args[args.index("--output") + 1])
        calls.append(args)
        name = out.name
        seed = int(args[args.index("--seed") + 1])
        m = {"dev": {"score": scores[name] + seed / 10000}}
        if args[args.index("--model") - 1] == "compress":
            m["predecessor_layers"] = 6
        # like the real commands (io.py): the folder appears whole (built as .NAME.tmp-*, then renamed), so a
        # parallel job's summary never reads a half-written metrics.json
        part = out.with_name(f".{out.name}.tmp-test")
        part.mkdir(parents=True)
        (part / "metrics.json").write_text(json.dumps(m))
        (part / "config.json").write_text("{}")  # a real run's folder is a loadable model
        (part / "model.safetensors").write_bytes(b"")
        if out.exists():  # --overwrite
            shutil.rmtree(out)
        part.rename(out)
        Path(log).write_text("ok")
    return sh


def test_run_task_shares_one_predecessor_across_seeds(results, tmp_path, monkeypatch):
    calls = []
    scores = {"predecessor": 0.80, "theseus": 0.78, "constant": 0.77, "truncation": 0.75}
    monkeypatch.setattr(results, "sh", fake_sh(calls, scores))
    for seed in (42, 43):
        results.run_task("rte", "minilm", tmp_path, seed, 3, None, predecessor_seed=42)
    preds = [c for c in calls if Path(c[c.index("--output") + 1]).name == "predecessor"]
    assert len(preds) == 1 and "42" in map(str, preds[0])  # fine-tuned once, with its own seed
    shared = str(tmp_path / "rte" / "seed42" / "predecessor")
    compress43 = [c for c in calls if str(tmp_path / "rte" / "seed43") in str(c[c.index("--output") + 1])]
    assert len(compress43) == 3 and all(str(c[c.index("--model") + 1]) == shared for c in compress43)
    s43 = json.loads((tmp_path / "rte" / "seed43" / "summary.json").read_text())
    assert s43["predecessor_layers"] == 6  # from compress's metrics.json
    assert s43["predecessor_seed"] == 42 and s43["predecessor"]["score"] == pytest.approx(0.8042)
    assert s43["theseus"]["score"] == pytest.approx(0.7843)
    # finished runs are not repeated, and their wall times survive a second invocation
    n = len(calls)
    results.run_task("rte", "minilm", tmp_path, 43, 3, None, predecessor_seed=42)
    assert len(calls) == n
    assert json.loads((tmp_path / "rte" / "seed43" / "summary.json").read_text())["seconds"] == s43["seconds"]


def test_a_root_continued_from_its_records_fine_tunes_a_predecessor_only_where_a_run_needs_it(
        results, tmp_path, monkeypatch):
    """A grid continued on a new machine from docs/records/<doc> (scores, no weights): a predecessor with
    only its metrics.json is fine-tuned again when a run of its task is still to do, and not when none is."""
    calls = []
    scores = {"predecessor": 0.80, "theseus": 0.78, "constant": 0.77, "truncation": 0.75}
    monkeypatch.setattr(results, "sh", fake_sh(calls, scores))
    for task in ("rte", "mrpc"):
        results.run_task(task, "minilm", tmp_path, 42, 3, None, predecessor_seed=42)
    for task in ("rte", "mrpc"):  # what keep_records copies: no weights anywhere
        for f in tmp_path.glob(f"{task}/seed42/*/*"):
            if f.name != "metrics.json":
                f.unlink()
    (tmp_path / "rte" / "seed42" / "constant" / "metrics.json").unlink()  # rte has a run to do, mrpc none
    calls.clear()
    results.run_task("rte", "minilm", tmp_path, 42, 3, None, predecessor_seed=42)
    results.run_task("mrpc", "minilm", tmp_path, 42, 3, None, predecessor_seed=42)
    outs = [Path(c[c.index("--output") + 1]).relative_to(tmp_path).as_posix() for c in calls]
    assert outs == ["rte/seed42/predecessor", "rte/seed42/constant"]
    # and a predecessor whose weights are there is not fine-tuned again for a new seed's runs
    calls.clear()
    results.run_task("rte", "minilm", tmp_path, 43, 3, None, predecessor_seed=42)
    assert all(Path(c[c.index("--output") + 1]).name != "predecessor" for c in calls) and len(calls) == 3


def write_summary(root, task, seed, pred, theseus, trunc, const):
    d = root / task / f"seed{seed}"
    d.mkdir(parents=True)
    s = {"task": task, "seed": seed, "predecessor_seed": 42, "model": "/m/minilm", "successor_layers": 3,
         "predecessor_layers": 6, "budget": {"max_seq_length": 64}, "seconds": {},
         "commands": {k: f"theseus-deploy {k}" for k in ("predecessor", "theseus", "constant", "truncation")},
         "predecessor": {"score": pred}, "theseus": {"score": theseus}, "truncation": {"score": trunc},
         "constant": {"score": const}}
    (d / "summary.json").write_text(json.dumps(s))


def test_report_medians_retention_wins_and_notes(results, tmp_path):
    root = tmp_path / "runs"
    # rte: three seeds, Theseus median 0.57 beats truncation median 0.55
    for seed, th, tr in ((42, 0.57, 0.50), (43, 0.60, 0.55), (44, 0.52, 0.56)):
        write_summary(root, "rte", seed, 0.60, th, tr, 0.54)
    write_summary(root, "sst2", 42, 0.90, 0.85, 0.86, 0.84)  # truncation ahead
    doc = tmp_path / "results.md"
    doc.write_text("old table\n" + results.NOTES + "\nmy reading\n")
    results.report(root, doc)
    text = doc.read_text()
    assert text.startswith("# Results: minilm, 6 -> 3 layers")
    assert "| rte | 3 | 60.0 | 57.0 | 95.0% | 55.0 | 54.0 | yes | yes |" in text
    assert "| sst2 | 1 | 90.0 | 85.0 | 94.4% | 86.0 | 84.0 | no | yes |" in text
    assert "| **macro avg** | | 75.0 | 71.0 | 94.7% | 70.5 | 69.0 | 1/2 | 2/2 |" in text
    # the targets are computed from the table: 94.7% < 97.5%, lowest 94.4% >= 93%, 1 and 2 wins < 4
    assert "| macro retention >= 97.5% | 94.7% | **no** |" in text
    assert "| no task below 93% | lowest 94.4% | yes |" in text
    assert "| ahead of truncation on >= 4 of 5 tasks | 1 of 2 | **no** |" in text
    assert "| ahead of the constant rate on >= 4 of 5 tasks | 2 of 2 | **no** |" in text
    assert "Only 2 of 5 tasks have results" in text
    assert "mean of the per-task retentions: 94.72% (lowest 94.4%)" in text
    assert "| rte | 44 [42] | 60.0 | 52.0 | 56.0 | 54.0 |" in text  # per-seed table
    assert "old table" not in text and text.rstrip().endswith("my reading")  # hand notes kept
    assert "Not run yet: cola, mrpc, stsb " in text


def test_full_profile_uses_compress_default_budget_and_parallel_order(results, tmp_path, monkeypatch):
    """--profile full: the 3-layer step count is what compress's own default rule picks for the
    task (3 epochs, at least 1500 steps, at most 20 epochs), shared by all three methods;
    predecessors run before any method even with several jobs; --constant-seeds limits the baseline."""
    glue = tmp_path / "glue" / "RTE"
    glue.mkdir(parents=True)
    rows = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\ta b {i}\tc d\t{'entailment' if i % 2 else 'not_entailment'}"
                                                   for i in range(320)]
    (glue / "train.tsv").write_text("\n".join(rows) + "\n")
    (glue / "dev.tsv").write_text("\n".join(rows[:9]) + "\n")
    assert results.default_steps("rte", str(tmp_path / "glue"), 32) == 10 * 20  # 10 steps/epoch: capped at 20 epochs
    calls = []
    scores = {"predecessor": 0.80, "theseus": 0.78, "constant": 0.77, "truncation": 0.75}
    monkeypatch.setattr(results, "sh", fake_sh(calls, scores))
    out = results.run_tasks([("rte", 42), ("rte", 43)], "minilm", tmp_path / "runs", 3, str(tmp_path / "glue"),
                            predecessor_seed=42, profile="full", theseus_flags=lambda S: ["--steps-to-full", S // 4],
                            constant_seeds={42}, n_jobs=3)
    names = [Path(c[c.index("--output") + 1]).name for c in calls]
    assert names[0] == "predecessor" and names.count("predecessor") == 1
    assert sorted(names[1:]) == ["constant", "theseus", "theseus", "truncation", "truncation"]
    for c in calls[1:]:
        assert c[c.index("--max-steps") + 1] == 200 and c[c.index("--lr") + 1] == "1e-4"  # same steps and lr
    theseus = [c for c in calls if Path(c[c.index("--output") + 1]).name == "theseus"]
    assert all(c[c.index("--steps-to-full") + 1] == 50 for c in theseus)
    assert "constant" in out[0] and "constant" not in out[1]


def test_ablation_winner_prefers_the_default_within_a_tie(results):
    d = results.DEFAULT_VARIANT
    rows = [{"variant": v, "score": s, "predecessor": 0.9}
            for v, s in ((d, 0.850), (d, 0.860), ("unfreeze-head", 0.8558), ("unfreeze-head", 0.8650),
                         ("short-replacement", 0.80), ("short-replacement", 0.81))]
    assert results.ablation_winner(rows) == "unfreeze-head"  # +0.3 point mean: more than the tie margin
    rows[2]["score"], rows[3]["score"] = 0.8505, 0.8600  # now within 0.1 point of retention of the default
    assert results.ablation_winner(rows) == d


def test_every_variant_states_both_knobs(results):
    """A variant names the head and the replacement length itself, so its rows keep their meaning
    when compress's defaults change (they did: docs/results.md's ablation)."""
    for v, f in results.VARIANTS.items():
        flags = list(map(str, f(400)))
        assert ("--unfreeze-head" in flags) != ("--no-unfreeze-head" in flags), v
        assert "--steps-to-full" in flags, v
    assert results.variant_flags_doc("long-replacement") == "--no-unfreeze-head --steps-to-full 3S/4"
    kd = [v for v in results.VARIANTS if "--distill-alpha" in map(str, results.VARIANTS[v](400))]
    assert kd and all("--distill-temperature" in map(str, results.VARIANTS[v](400)) for v in kd)
    assert results.variant_flags_doc("kd-a0.9-t2") == \
        "--unfreeze-head --steps-to-full S/4 --distill-alpha 0.9 --distill-temperature 2"


def test_precision_reaches_every_run_and_the_grid_reuses_the_ablation(results, tmp_path, monkeypatch):
    """--mixed-precision goes to the predecessor, all three methods and the ablation alike (one table,
    one precision); the grid's Theseus run of a (task, seed) the ablation already ran with the chosen
    variant's flags is that run (linked, not repeated)."""
    calls = []
    scores = {"predecessor": 0.80, "theseus": 0.78, "constant": 0.77, "truncation": 0.75,
              **{f"{v}-seed42": 0.78 for v in results.VARIANTS}}
    monkeypatch.setattr(results, "sh", fake_sh(calls, scores))
    monkeypatch.setattr(results, "PRECISION", "bf16")
    root = tmp_path / "runs"
    a = results.run_ablation(["rte"], [42], ["frozen-half", "unfreeze-head"], "minilm", root, 3, None, profile="cpu")
    assert {r["variant"] for r in a["rows"]} == {"frozen-half", "unfreeze-head"}
    n = len(calls)
    results.run_tasks([("rte", 42)], "minilm", root, 3, None, predecessor_seed=42, profile="cpu",
                      theseus_flags=results.VARIANTS["unfreeze-head"], variant="unfreeze-head")
    names = [Path(c[c.index("--output") + 1]).name for c in calls[n:]]
    assert sorted(names) == ["constant", "truncation"]  # theseus = the ablation's unfreeze-head run
    linked = root / "rte" / "seed42" / "theseus"
    assert linked.is_symlink() and linked.resolve() == (root / "ablation" / "rte" / "unfreeze-head-seed42").resolve()
    for c in calls:
        assert c[c.index("--mixed-precision") + 1] == "bf16"
    summary = json.loads((root / "rte" / "seed42" / "summary.json").read_text())
    assert summary["budget"]["mixed_precision"] == "bf16"


def test_grid_from_ablation_without_an_ablation_uses_the_default_variant(tmp_path):
    """`run --from-ablation` where ROOT has no ablation (skipped, as for MPNet on a GPU budget, or a
    dry run of scripts/results_full.sh) runs Theseus with the default variant, i.e. compress's
    defaults; it raised KeyError('default') after the variants were renamed."""
    import subprocess
    import sys

    model = tmp_path / "model"
    model.mkdir()
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "results.py"), "--dry-run", "--root", str(tmp_path / "runs"),
                        "--doc", str(tmp_path / "doc.md"), "--model", str(model), "run", "--from-ablation", "--tasks", "rte"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "missing: compress's defaults" in r.stdout
    theseus = [ln for ln in r.stdout.splitlines() if ln.endswith("/theseus")]
    assert len(theseus) == 1 and "--unfreeze-head --steps-to-full" in theseus[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "doc.md").exists()  # a dry run writes nothing


def test_speed_section_names_the_cpu_flags_and_versions(results, tmp_path):
    """Every speed figure carries the CPU flags it was measured with (CPUs differ between machines:
    AMX on some, AVX512-BF16/VNNI without AMX on others)."""
    env = {"cpu": "AMD EPYC", "torch_threads": 2, "cpu_flags": ["avx512f", "avx512_bf16"],
           "versions": {"torch": "2.13.0+cpu", "onnxruntime": "1.32.0"}}
    ratio = {"median": 1.9, "min": 1.8, "max": 2.0}
    r = {"environment": env, "config": {"rounds": 9},
         "models": [{"config": {"num_hidden_layers": 6}, "source": "p"}, {"config": {"num_hidden_layers": 3}, "source": "s"}],
         "speedups": [{"backend": "onnx", "batch_size": 8, "seq_len": 128, "ideal_speedup": 2.0,
                       "vs_predecessor_same_backend": ratio}]}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text(json.dumps(r))
    text = "\n".join(results.bench_lines(tmp_path))
    assert "AMD EPYC (avx512f, avx512_bf16), 2 threads, torch 2.13.0+cpu, onnxruntime 1.32.0" in text
    assert "| onnx | 8 | 128 | 1.90x [1.80-2.00] | 2.00x | - |" in text


def test_results_full_dry_run_mpnet_command_plans_and_writes_nothing(tmp_path, synthetic_glue):
    """The MPNet 12 -> 6 command of docs/results.md, as a dry run: two tasks, 6-layer successors, no
    ablation, no extra seeds, the bench last; exit 0 and nothing written (before, a fresh root made the
    grid raise KeyError and the bench exit with 'no finished runs')."""
    import os
    import subprocess
    import sys

    model = tmp_path / "model"
    model.mkdir()
    env = {**os.environ, "DRY_RUN": "1", "PY": sys.executable, "MODEL": str(model), "LAYERS": "6",
           "TASKS": "sst2,mrpc", "SEED_TASKS": "", "ABLATION_TASKS": "", "PRECISION": "bf16", "JOBS": "1",
           "ROOT": str(tmp_path / "runs"), "DOC": str(tmp_path / "doc.md"), "DATA_DIR": str(synthetic_glue)}
    r = subprocess.run(["bash", str(REPO / "scripts" / "results_full.sh")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    stages = [ln.split("] ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert stages == ["predecessors", "grid seed 42", "bench", f"done: {tmp_path / 'doc.md'}"]
    cmds = [ln for ln in r.stdout.splitlines() if ln.startswith("+ ")]
    for task in ("sst2", "mrpc"):
        mine = [c for c in cmds if f"--task {task} " in c]
        assert any(c.endswith(f"{task}/seed42/theseus") and "--successor-layers 6" in c for c in mine)
        assert any(c.endswith(f"{task}/seed42/truncation") and "--keep-layers 6" in c for c in mine)
        assert all("--mixed-precision bf16" in c for c in mine)
    assert " bench " in cmds[-1] and "mrpc/seed42/theseus" in cmds[-1]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "doc.md").exists()


# ---------------------------------------------------------------------------- KD, loyalty, --profile mpnet
def test_mpnet_profile_dry_run_plans_five_methods_alike_and_writes_nothing(tmp_path, synthetic_glue):
    """--profile mpnet: 12 -> 6 with truncation, constant, kd, theseus, theseus-kd, every method the
    same steps and lr; the soft targets on kd and theseus-kd only; predecessors 3 epochs at 2e-5;
    length-grouped batches, checkpoints for resuming, max_seq_length from the data's p99."""
    import math
    import subprocess
    import sys

    import numpy as np

    from tiny import make_tiny_model
    from theseus_deploy.data import load_task
    from theseus_deploy.hf import load_tokenizer

    model = make_tiny_model(tmp_path / "model", "bert", 2)
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "results.py"), "--dry-run", "--profile", "mpnet",
                        "--model", str(model), "--data-dir", str(synthetic_glue), "--root", str(tmp_path / "runs"),
                        "--doc", str(tmp_path / "doc.md"), "run", "--tasks", "mrpc,rte"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cmds = [ln[2:].split() for ln in r.stdout.splitlines() if ln.startswith("+ ")]
    for task in ("mrpc", "rte"):
        mine = [c for c in cmds if c[c.index("--task") + 1] == task]
        by = {Path(c[c.index("--output") + 1]).name: c for c in mine}
        assert sorted(by) == sorted(["predecessor", "truncation", "constant", "kd", "theseus", "theseus-kd"])
        pred = by.pop("predecessor")
        assert pred[pred.index("--epochs") + 1] == "3" and pred[pred.index("--lr") + 1] == "2e-5"
        assert {by[m][by[m].index("--max-steps") + 1] for m in by} == {"20"}  # compress's rule on 8 rows: 20 epochs
        assert {by[m][by[m].index("--lr") + 1] for m in by} == {"1e-4"}
        for m, c in by.items():
            kd = "--distill-alpha" in c
            assert kd == m.endswith("kd"), m
            if kd:
                assert c[c.index("--distill-alpha") + 1] == "0.5" and c[c.index("--distill-temperature") + 1] == "2"
        assert "--keep-layers" in by["kd"] and by["kd"][by["kd"].index("--keep-layers") + 1] == "6"
        assert by["theseus-kd"][by["theseus-kd"].index("--successor-layers") + 1] == "6"
        data = load_task(task, str(synthetic_glue), "train")
        a, b = zip(*data.texts)
        lengths = [len(x) for x in load_tokenizer(str(model))(list(a), list(b))["input_ids"]]
        want = min(128, 8 * math.ceil(np.percentile(lengths, 99) / 8))
        for c in mine:
            assert c[c.index("--max-seq-length") + 1] == str(want)
            assert "--group-by-length" in c and c[c.index("--save-steps") + 1] == "50" and "--resume" not in c
    assert not (tmp_path / "runs").exists() and not (tmp_path / "doc.md").exists()


def test_a_killed_run_continues_with_resume(results, tmp_path, monkeypatch):
    """A run killed mid-way left OUT.partial/checkpoint.pt: the next invocation resumes it (same
    command plus --resume, its log appended) instead of starting over; finished runs are skipped."""
    calls = []
    scores = {"predecessor": 0.80, "theseus": 0.78, "constant": 0.77, "truncation": 0.75, "kd": 0.76, "theseus-kd": 0.79}
    monkeypatch.setattr(results, "sh", fake_sh(calls, scores))
    root = tmp_path / "runs"
    part = root / "rte" / "seed42" / "theseus-kd.partial"
    part.mkdir(parents=True)
    (part / "checkpoint.pt").write_bytes(b"x")
    (root / "rte" / "seed42" / "predecessor.partial").mkdir()
    (root / "rte" / "seed42" / "predecessor.partial" / "checkpoint.pt").write_bytes(b"x")
    results.run_tasks([("rte", 42)], "minilm", root, 3, None, profile="cpu", methods=results.ALL_METHODS)
    by = {Path(c[c.index("--output") + 1]).name: c for c in calls}
    assert sorted(by) == sorted(["predecessor", *results.ALL_METHODS])
    assert "--resume" in by["theseus-kd"] and "--resume" in by["predecessor"]
    assert all("--resume" not in c for n, c in by.items() if n not in ("theseus-kd", "predecessor"))
    s = json.loads((root / "rte" / "seed42" / "summary.json").read_text())
    assert s["commands"]["theseus-kd"].endswith("theseus-kd") and "--resume" not in s["commands"]["theseus-kd"]
    assert set(s["machine"]) == {"predecessor", *results.ALL_METHODS} and "cpu" in s["machine"]["kd"]


def test_summary_after_every_finished_run_and_a_partial_report(results, tmp_path, monkeypatch):
    """A grid of CPU-days reports what it has: summary.json is rewritten after each finished run, the
    runs still to come listed as unfinished; the report shows their cells as '-' and names them."""
    calls, seen = [], []
    scores = {"predecessor": 0.80, "theseus": 0.78, "constant": 0.77, "truncation": 0.75, "kd": 0.76, "theseus-kd": 0.79}
    sh = fake_sh(calls, scores)
    root = tmp_path / "runs"
    summary = root / "rte" / "seed42" / "summary.json"

    def sh_killed_at_kd(args, log):
        if Path(args[args.index("--output") + 1]).name == "kd":
            seen.append(json.loads(summary.read_text()))
            raise KeyboardInterrupt  # the session ends while kd trains
        sh(args, log)

    monkeypatch.setattr(results, "sh", sh_killed_at_kd)
    order = ("theseus", "constant", "truncation", "kd", "theseus-kd")  # the run order (--methods)
    with pytest.raises(KeyboardInterrupt):
        results.run_tasks([("rte", 42)], "minilm", root, 3, None, profile="cpu", methods=order)
    s = json.loads(summary.read_text())
    assert s == seen[0] and s["unfinished"] == ["kd", "theseus-kd"]
    assert {k for k in results.ALL_METHODS if k in s} == {"theseus", "constant", "truncation"}
    doc = tmp_path / "r.md"
    results.report_kd(root, doc, "6to3")
    text = doc.read_text()
    assert "| rte | 1 | 80.4 | 75.4 (93.8%) | 77.4 (96.3%) | 78.4 (97.5%) **best** |" in text  # kd columns not yet
    assert "**Partial grid**: runs not finished yet" in text and "rte seed 42: kd, theseus-kd." in text
    # the next invocation finishes them: the summary is complete
    monkeypatch.setattr(results, "sh", sh)
    results.run_tasks([("rte", 42)], "minilm", root, 3, None, profile="cpu", methods=order)
    s = json.loads(summary.read_text())
    assert s["unfinished"] == [] and s["kd"]["score"] == pytest.approx(0.7642)


def write_kd_summary(root, task, seed, scores, loyalty=None):
    d = root / task / f"seed{seed}"
    d.mkdir(parents=True)
    env = {"cpu": "AMD EPYC", "cpu_flags": ["avx512f"], "torch_threads": 2, "python": "3.12",
           "versions": {"torch": "2.13.0+cpu", "transformers": "5.24.0"}}
    s = {"task": task, "seed": seed, "predecessor_seed": 42, "model": "/m/all-mpnet-base-v2", "successor_layers": 6,
         "predecessor_layers": 12, "budget": {"profile": "mpnet", "max_seq_length": 96,
                                               "distill": {"alpha": "0.5", "temperature": "2"}},
         "seconds": {}, "machine": {k: env for k in scores if k != "predecessor"},
         "commands": {k: f"theseus-deploy {k}" for k in scores},
         **{k: {"score": v} for k, v in scores.items()}, "loyalty": loyalty or {}}
    (d / "summary.json").write_text(json.dumps(s))


def test_kd_report_tables_loyalty_and_targets_met_or_not_by_how_much(results, tmp_path):
    root = tmp_path / "runs"
    # mrpc: theseus-kd 0.87 / 0.88 = 98.9%, ahead of all; rte: 0.67 / 0.70 = 95.7%, behind vanilla KD (0.68)
    write_kd_summary(root, "mrpc", 42, {"predecessor": 0.88, "truncation": 0.84, "constant": 0.86, "kd": 0.85,
                                        "theseus": 0.86, "theseus-kd": 0.87},
                     {"theseus-kd": {"label": 0.95, "probability": 0.9}, "truncation": {"label": 0.9, "probability": 0.85}})
    write_kd_summary(root, "rte", 42, {"predecessor": 0.70, "truncation": 0.62, "constant": 0.68, "kd": 0.68,
                                       "theseus": 0.66, "theseus-kd": 0.67},
                     {"theseus-kd": {"label": 0.8, "probability": 0.7}})
    doc = tmp_path / "results-12to6.md"
    results.report_kd(root, doc, "12to6")
    text = doc.read_text()
    assert text.startswith("# Results: all-mpnet-base-v2, 12 -> 6 layers")
    assert ("| mrpc | 1 | 88.0 | 84.0 (95.5%) | 86.0 (97.7%) | 85.0 (96.6%) | 86.0 (97.7%) | 87.0 (98.9%) **best** |"
            in text)
    assert "| **macro avg** (2 tasks) |  | 79.0 | 73.0 (92.4%) | 77.0 (97.5%) | 76.5 (96.8%) | 76.0 (96.2%) | 77.0 (97.5%) |" in text
    assert "Best Theseus recipe (higher macro average over the tasks both ran): **Theseus + KD**" in text
    assert "| mrpc | 90.0 / 85.0 | - | - | - | 95.0 / 90.0 |" in text  # loyalty table
    # targets: 97.5% macro (-0.9), lowest 95.7% (-0.3), truncation 2/2, KD 1/2 (rte -1.0), constant 1/2 not most
    assert "| macro retention >= 98.4% over the tasks run (MRPC, RTE among them) | 97.5% over 2 (mrpc, rte) | **no** | -0.9 points |" in text
    assert "| lowest task >= 96% | 95.7% (rte) | **no** | -0.3 points |" in text
    assert "| ahead of truncation on every task run | 2 of 2 | yes | smallest margin +3.0 points (mrpc) |" in text
    assert "| ahead of vanilla KD on every task run | 1 of 2 | **no** | smallest margin -1.0 points (rte) |" in text
    assert "| ahead of constant p=0.5 on most tasks | 1 of 2 | **no** | -1 tasks vs the 2 needed |" in text
    assert "| label loyalty reported per task | 2 of 2 | yes |  |" in text
    assert "Not run yet: stsb, cola." in text
    assert "- AMD EPYC (avx512f), 2 threads, torch 2.13.0+cpu, transformers 5.24.0, python 3.12: 10 runs" in text


def test_kd_report_6to3_targets(results, tmp_path):
    root = tmp_path / "runs"
    for task in ("mrpc", "rte", "stsb", "cola", "sst2"):
        write_kd_summary(root, task, 42, {"predecessor": 0.80, "truncation": 0.77, "constant": 0.79, "theseus": 0.795,
                                          "theseus-kd": 0.78})
    doc = tmp_path / "r.md"
    results.report_kd(root, doc, "6to3")
    text = doc.read_text()
    assert "best Theseus recipe: Theseus)" in text  # 79.5 > 78.0
    assert "| macro retention >= 98.0% over the tasks run | 99.4% over 5" in text and "| yes | +1.4 points |" in text
    assert "| ahead of truncation on 5 of 5 tasks | 5 of 5 | yes |" in text
    assert "| ahead of constant p=0.5 on >= 4 of 5 tasks | 5 of 5 | yes | +1 tasks |" in text


def test_mpnet_profile_end_to_end_on_a_tiny_model(tmp_path, synthetic_glue):
    """The commands --profile mpnet writes are accepted by the real CLI (every flag, the soft
    targets, --group-by-length, --save-steps) and their metrics give every method a loyalty figure
    and the report its tables: one task, a 2-layer tiny model, 1-layer successors, 2 steps each."""
    import subprocess
    import sys

    from tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "model", "bert", 2)
    doc = tmp_path / "doc.md"
    base = [sys.executable, str(REPO / "scripts" / "results.py"), "--profile", "mpnet", "--model", str(model),
            "--data-dir", str(synthetic_glue), "--root", str(tmp_path / "runs"), "--doc", str(doc),
            "--successor-layers", "1", "--successor-steps", "2"]
    r = subprocess.run([*base, "run", "--tasks", "rte"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "rte" / "seed42" / "summary.json").read_text())
    assert set(s["loyalty"]) == {"truncation", "constant", "kd", "theseus", "theseus-kd"}
    assert all(set(v) == {"label", "probability"} for v in s["loyalty"].values())
    text = doc.read_text()
    assert "## Loyalty to the predecessor (dev)" in text and "| macro retention >= 98.4%" in text
    assert "--group-by-length --save-steps 50" in text and "--distill-alpha 0.5 --distill-temperature 2" in text


def test_kd_report_last_evaluation_and_ablation_sections(results, tmp_path):
    """Runs keep their best dev evaluation; the report also shows each run's last one (no choice on
    dev at all), from train_log.jsonl, and the KD ablation's table where ROOT/ablation has one."""
    root = tmp_path / "runs"
    write_kd_summary(root, "mrpc", 42, {"predecessor": 0.80, "truncation": 0.76, "theseus": 0.79})
    write_kd_summary(root, "rte", 42, {"predecessor": 0.60, "truncation": 0.55, "theseus": 0.61})
    for task, method, evals in (("mrpc", "theseus", [0.75, 0.79, 0.78]), ("mrpc", "truncation", [0.76, 0.70]),
                                ("rte", "theseus", [0.61, 0.57])):
        d = root / task / "seed42" / method
        d.mkdir(parents=True)
        log = [{"step": 10, "loss": 0.5}] + [{"step": 20 * (i + 1), "eval": {"score": e}} for i, e in enumerate(evals)]
        (d / "train_log.jsonl").write_text("\n".join(map(json.dumps, log)) + "\n")
    (root / "ablation").mkdir()
    rows = [{"task": "mrpc", "variant": v, "seed": 42, "out": str(root / "ablation" / v), "score": s,
             "command": f"theseus-deploy compress {v}", "predecessor": 0.80}
            for v, s in (("unfreeze-short", 0.78), ("kd-a0.5-t2", 0.79))]
    (root / "ablation" / "kd-a0.5-t2").mkdir()  # its run's loyalty; unfreeze-short's run recorded none
    (root / "ablation" / "kd-a0.5-t2" / "metrics.json").write_text(json.dumps({"loyalty": {"label": 0.913, "probability": 0.9}}))
    (root / "ablation" / "summary.json").write_text(json.dumps({"rows": rows, "winner": "kd-a0.5-t2"}))
    doc = tmp_path / "r.md"
    results.report_kd(root, doc, "12to6")
    text = doc.read_text()
    assert "## Without selection on dev: each run's last evaluation" in text
    assert "| mrpc | 70.0 (87.5%) | 78.0 (97.5%) |" in text  # the last, not the best (79.0)
    assert "| rte | - | 57.0 (95.0%) |" in text  # no log for rte truncation: no cell
    # (78 + 57) / 2 over (80 + 60) / 2 = 96.4%
    assert "Macro retention of Theseus at the last evaluation: 96.4% over 2 (mrpc, rte)." in text
    assert "| kd-a0.5-t2 **(chosen)** | `--unfreeze-head --steps-to-full S/4 --distill-alpha 0.5 --distill-temperature 2` | 79.0 (1), loyalty 91.3 |" in text
    assert "| unfreeze-short | `--unfreeze-head --steps-to-full S/4` | 78.0 (1) |" in text


def test_from_ablation_gives_vanilla_kd_the_chosen_soft_targets(tmp_path, synthetic_glue):
    """When the ablation chooses a variant with soft targets, `run --from-ablation` trains vanilla KD
    with the same alpha and temperature (like with like); a conflicting --distill-alpha is refused."""
    import subprocess
    import sys

    model = tmp_path / "model"
    model.mkdir()
    root = tmp_path / "runs"
    (root / "ablation").mkdir(parents=True)
    (root / "ablation" / "summary.json").write_text(json.dumps({"rows": [], "winner": "kd-a0.9-t2"}))
    base = [sys.executable, str(REPO / "scripts" / "results.py"), "--dry-run", "--root", str(root), "--doc",
            str(tmp_path / "doc.md"), "--model", str(model), "--data-dir", str(synthetic_glue)]
    r = subprocess.run([*base, "run", "--from-ablation", "--methods", "theseus,kd", "--tasks", "rte"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cmd = {ln.rsplit("/", 1)[1]: ln for ln in r.stdout.splitlines() if ln.startswith("+ ")}
    for name in ("theseus", "kd"):
        assert "--distill-alpha 0.9 --distill-temperature 2" in cmd[name], cmd[name]
    assert "--keep-layers" in cmd["kd"]
    r = subprocess.run([*base, "run", "--from-ablation", "--distill-alpha", "0.5", "--methods", "kd", "--tasks", "rte"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "differ from the ablation's chosen variant kd-a0.9-t2" in r.stderr


def test_kd_report_says_where_the_predecessor_is_no_ceiling(results, tmp_path):
    """A successor more than a point above its own predecessor (an undertrained predecessor) makes
    retention above 100% meaningless there: the report names the task and both budgets."""
    root = tmp_path / "runs"
    write_kd_summary(root, "mrpc", 42, {"predecessor": 0.864, "theseus": 0.870})  # +0.6: within the slack
    write_kd_summary(root, "rte", 42, {"predecessor": 0.617, "theseus": 0.700, "truncation": 0.650})
    for task in ("mrpc", "rte"):
        s = json.loads((root / task / "seed42" / "summary.json").read_text())
        s["budget"].update(predecessor="--epochs 3", compress_steps=1560)
        (root / task / "seed42" / "summary.json").write_text(json.dumps(s))
    doc = tmp_path / "r.md"
    results.report_kd(root, doc, "12to6")
    text = doc.read_text()
    assert "**The predecessor is not a ceiling** on rte: a successor scores above it (rte: Theseus 70.0 vs 61.7, +8.3 points)" in text
    assert "rte: predecessor --epochs 3, each successor 1560 steps" in text and "mrpc:" not in text.split("not a ceiling")[1].split("\n")[0]


def test_report_keeps_its_inputs_and_writes_the_same_tables_from_them(tmp_path):
    """`report` copies what it read (summaries, metrics, evaluation rows, the ablation) into
    docs/records/<doc>/, without the runs' weights or their per-step loss rows; `report --root` on
    that copy writes the same tables after the run folders are gone. A folder in the way that is not
    a records folder is refused before anything is written."""
    import shutil
    import subprocess
    import sys

    root = tmp_path / "runs"
    write_kd_summary(root, "mrpc", 42, {"predecessor": 0.80, "truncation": 0.76, "theseus": 0.79},
                     {"theseus": {"label": 0.9, "probability": 0.8}})
    for method, evals in (("theseus", [0.75, 0.79, 0.78]), ("truncation", [0.76, 0.70])):
        d = root / "mrpc" / "seed42" / method
        d.mkdir(parents=True)
        log = [{"step": 10, "loss": 0.5}] + [{"step": 20 * (i + 1), "eval": {"score": e}} for i, e in enumerate(evals)]
        (d / "train_log.jsonl").write_text("\n".join(map(json.dumps, log)) + "\n")
        (d / "metrics.json").write_text(json.dumps({"dev": {"score": evals[0]}}))
        (d / "model.safetensors").write_bytes(b"\0" * 4096)  # weights: never kept
    pred = root / "mrpc" / "seed42" / "predecessor"
    pred.mkdir()
    (pred / "metrics.json").write_text(json.dumps({"dev": {"score": 0.80}}))
    run = root / "ablation" / "mrpc" / "kd-a0.5-t2-seed42"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"loyalty": {"label": 0.913, "probability": 0.9}}))
    rows = [{"task": "mrpc", "variant": v, "seed": 42, "out": str(root / "ablation" / "mrpc" / f"{v}-seed42"),
             "score": s, "command": f"theseus-deploy compress {v}", "predecessor": 0.80}
            for v, s in (("unfreeze-short", 0.78), ("kd-a0.5-t2", 0.79))]
    (root / "ablation" / "summary.json").write_text(json.dumps({"rows": rows, "winner": "kd-a0.5-t2"}))

    docs = tmp_path / "docs"
    docs.mkdir()
    doc = docs / "results-12to6.md"
    cli = [sys.executable, str(REPO / "scripts" / "results.py"), "--profile", "mpnet", "report", "--doc", str(doc)]
    # a folder of the user's where the records would go: refused, and neither it nor the doc is touched
    (docs / "records" / "results-12to6").mkdir(parents=True)
    (docs / "records" / "results-12to6" / "mine.txt").write_text("keep")
    r = subprocess.run([*cli, "--root", str(root)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("results.py: error: --records")
    assert "Traceback" not in r.stderr and not doc.exists()
    assert (docs / "records" / "results-12to6" / "mine.txt").read_text() == "keep"
    shutil.rmtree(docs / "records")

    r = subprocess.run([*cli, "--root", str(root)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    kept = docs / "records" / "results-12to6"
    first = doc.read_text()
    assert f"Its inputs are kept in `{kept}/` (`python scripts/results.py --profile mpnet report --root {kept} --doc {doc}`" in first
    files = sorted(str(f.relative_to(kept)) for f in kept.rglob("*") if f.is_file())
    assert files == ["ablation/mrpc/kd-a0.5-t2-seed42/metrics.json", "ablation/summary.json",
                     "mrpc/seed42/predecessor/metrics.json", "mrpc/seed42/summary.json",
                     "mrpc/seed42/theseus/metrics.json", "mrpc/seed42/theseus/train_log.jsonl",
                     "mrpc/seed42/truncation/metrics.json", "mrpc/seed42/truncation/train_log.jsonl", "records.json"]
    assert '"loss"' not in (kept / "mrpc/seed42/theseus/train_log.jsonl").read_text()  # only the evaluations

    shutil.rmtree(root)  # the machine with the runs is gone: the doc comes again from what was kept
    r = subprocess.run([*cli, "--root", str(kept)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    again = doc.read_text()
    body = lambda t: [x for x in t.splitlines() if "Generated by" not in x and "Its inputs are kept" not in x]  # noqa: E731
    assert body(again) == body(first)
    assert "| mrpc | 70.0 (87.5%) | 78.0 (97.5%) |" in again  # the last evaluation, from the kept rows
    assert "79.0 (1), loyalty 91.3" in again  # the ablation's loyalty, from the kept metrics.json
    assert kept.is_dir() and "Its inputs are kept" not in again  # written from the records: they stay as they are


def test_earlier_results_are_marked_counted_in_the_targets_replaced_by_a_new_run_and_kept(results, tmp_path):
    """A task whose run folders are gone (earlier.json: the figures a report printed, x100) stands in the
    tables marked †, with its loyalty, last evaluations, budget and commands, and counts in the targets
    beside the tasks ROOT ran; ROOT's own run of the task replaces it; keep_records carries the file over."""
    root = tmp_path / "runs"
    write_kd_summary(root, "cola", 42, {"predecessor": 0.60, "truncation": 0.50, "kd": 0.52, "theseus-kd": 0.58},
                     {"theseus-kd": {"label": 0.9, "probability": 0.8}})
    records = tmp_path / "docs" / "records" / "r"
    records.mkdir(parents=True)
    earlier = {"why": "lost", "commit": "abc1234", "machine": ["Old CPU (avx512f), 1 threads: 2 runs"],
               "tasks": {t: {"seeds": [42], "predecessor": 80.0,
                             "scores": {"truncation": 82.0, "kd": 81.0, "theseus-kd": tk},
                             "loyalty": {m: {"label": 90.0, "probability": 70.0} for m in ("truncation", "kd", "theseus-kd")},
                             "last": {"truncation": 79.0, "kd": 80.0, "theseus-kd": 78.0},
                             "budget": {"predecessor": "--epochs 3", "compress_steps": 100}, "seconds": {"kd": 5.0},
                             "commands": {"predecessor": f"theseus-deploy finetune {t}", "theseus-kd": f"theseus-deploy compress {t}"}}
                         for t, tk in (("mrpc", 80.8), ("cola", 10.0))}}
    (records / "earlier.json").write_text(json.dumps(earlier))
    (records / "records.json").write_text("{}")  # a records folder (keep_records replaces only such a folder)
    doc = tmp_path / "docs" / "r.md"
    results.report_kd(root, doc, "12to6", records)
    text = doc.read_text()
    assert "| mrpc † | 1 | 80.0 | 82.0 (102.5%) **best** | 81.0 (101.2%) | 80.8 (101.0%) |" in text
    assert "| cola | 1 | 60.0 | 50.0 (83.3%) | 52.0 (86.7%) | 58.0 (96.7%) **best** |" in text  # ROOT's run wins
    assert "† mrpc: run before the report kept its inputs" in text and "at commit abc1234" in text
    # targets over both tasks: macro (58 + 80.8) / (60 + 80) = 99.1%; truncation ahead on mrpc (82.0 > 80.8)
    assert "| 99.1% over 2 (cola, mrpc); missing rte |" in text
    assert "| ahead of truncation on every task run | 1 of 2 | **no** | smallest margin -1.2 points (mrpc) |" in text
    assert "| mrpc | 90.0 / 70.0 | 90.0 / 70.0 | 90.0 / 70.0 |" in text  # loyalty
    assert "| mrpc | 79.0 (98.8%) | 80.0 (100.0%) | 78.0 (97.5%) |" in text  # the last evaluations, as recorded
    assert "theseus-deploy compress mrpc" in text and "theseus-deploy compress cola" not in text
    assert "- Old CPU (avx512f), 1 threads: 2 runs (†: mrpc)" in text
    assert results.keep_records(root, records) > 0
    assert json.loads((records / "earlier.json").read_text()) == earlier


def test_methods_run_in_the_order_given(results, tmp_path, monkeypatch):
    """--methods is also the run order (on a CPU budget the runs that matter most start first)."""
    calls = []
    monkeypatch.setattr(results, "sh", fake_sh(calls, {"predecessor": 0.8, "theseus-kd": 0.7, "truncation": 0.6,
                                                       "kd": 0.65, "constant": 0.6, "theseus": 0.7}))
    monkeypatch.setattr(results, "budget", lambda *a: (64, ["--max-steps", 10], 20, 8))
    for methods in (("theseus-kd", "kd", "truncation"), ("truncation", "constant", "theseus-kd")):
        calls.clear()
        results.run_tasks([("rte", 42)], "m", tmp_path / methods[0], 3, None, methods=methods)
        assert [Path(c[c.index("--output") + 1]).name for c in calls] == ["predecessor", *methods]


def test_bench_times_the_backends_given(tmp_path):
    """`bench --backends`: the backends timed (an artifact that fails validation ends a bench, so a
    grid's bench can leave one out); an unknown one is refused before anything runs."""
    import subprocess
    import sys

    base = [sys.executable, str(REPO / "scripts" / "results.py"), "--profile", "mpnet", "--root", str(tmp_path / "r"),
            "--dry-run", "bench", "--tasks", "cola"]
    r = subprocess.run([*base, "--backends", "torch,onnx"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cmd = next(ln for ln in r.stdout.splitlines() if ln.startswith("+ ")).split()
    assert [cmd[i + 1] for i, x in enumerate(cmd) if x == "--backend"] == ["torch", "onnx"]
    r = subprocess.run([*base, "--backends", "torch,tensorflow"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown --backends tensorflow" in r.stderr and not (tmp_path / "r").exists()
