"""`theseus-deploy sweep`: the decision on known numbers, and a whole sweep on a tiny model
(kill and resume, re-deciding without retraining, best/ loads, bad input)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import REPO, make_tiny_model
from test_train import write_toy
from theseus_deploy.cli import cli
from theseus_deploy.config import SweepConfig
from theseus_deploy.errors import UsageError
from theseus_deploy.sweep.api import parse_depths, run_sweep
from theseus_deploy.sweep.pareto import Point, decide, frontier, nothing_message, parse_latency, parse_shape
from theseus_deploy.sweep.progress import Progress


# ------------------------------------------------------------------ the decision on known numbers
def P(layers, backend, score, ms, pred=0.90):
    return Point(layers, backend, score, ms / 1000, pred - score)


POINTS = [P(6, "torch", 0.90, 10.0), P(6, "onnx", 0.90, 6.0), P(4, "onnx", 0.89, 4.0), P(3, "onnx-int8", 0.885, 2.0),
          P(3, "torch", 0.885, 5.0), P(2, "onnx-int8", 0.86, 1.5), P(4, "torch", 0.85, 7.0)]


def test_frontier_on_known_points():
    names = [POINTS[i].name for i in frontier(POINTS)]
    # L6 torch is dominated by L6 onnx (same score, faster); L3 torch by L3 onnx-int8; L4 torch by everything
    assert names == ["L2 onnx-int8", "L3 onnx-int8", "L4 onnx", "L6 onnx"]


def test_frontier_ties_keep_one_point():
    pts = [P(4, "a", 0.8, 2.0), P(4, "b", 0.8, 2.0), P(3, "c", 0.8, 3.0)]
    assert frontier(pts) == [0]  # exact duplicate: the first stays; same score but slower: dominated


def test_choice_within_budget_and_drop():
    d = decide(POINTS, 0.005, 0.01)
    assert POINTS[d.choice].name == "L4 onnx"          # best score at <= 5 ms with drop <= 1 point
    assert d.choice in d.frontier
    d = decide(POINTS, 0.005, 0.02)
    assert POINTS[d.choice].name == "L4 onnx"
    d = decide(POINTS, 0.003, 0.05)
    assert POINTS[d.choice].name == "L3 onnx-int8"      # L4 onnx is 4 ms: over budget
    d = decide(POINTS, 0.003, 0.01)
    assert d.choice is None                             # L3 int8 drops 1.5 points


def test_choice_ties_go_to_the_faster_then_shallower_point():
    pts = [P(6, "torch", 0.9, 3.0), P(6, "onnx", 0.9, 2.0), P(4, "onnx", 0.88, 1.0)]
    assert decide(pts, 0.005, 0.05).choice == 1
    pts = [P(6, "onnx", 0.9, 2.0), P(4, "onnx", 0.9, 2.0)]
    assert decide(pts, 0.005, 0.05).choice == 1


def test_everything_within_budget_picks_the_best_score():
    d = decide(POINTS, 1.0, 1.0)
    assert POINTS[d.choice].name == "L6 onnx"
    assert decide(POINTS, None, 0.0).choice == 1        # no budget: best score, faster of the tie


def test_nothing_within_budget_names_the_closest_point():
    d = decide(POINTS, 0.001, 0.01)
    # excess = latency over budget / budget + drop over limit / limit: L3 int8 1.0 + 0.5 beats L2 int8 0.5 + 3.0
    assert d.choice is None and POINTS[d.closest].name == "L3 onnx-int8"
    d = decide(POINTS, 0.001, 0.05)
    assert POINTS[d.closest].name == "L2 onnx-int8"      # within the drop limit now: only 50% over budget
    msg = nothing_message(POINTS, d, "p99")
    assert "\n" not in msg and "L2 onnx-int8" in msg and "50% over budget" in msg and "1.00 ms" in msg


def test_closest_tie_goes_to_the_faster_point():
    # same depth, same score just over the drop limit, both within the budget
    pts = [P(6, "torch", 0.90, 12.0), P(3, "torch-bf16", 0.8897, 7.5), P(3, "onnx-int8", 0.8897, 4.9)]
    d = decide(pts, 0.010, 0.01)
    assert d.choice is None and pts[d.closest].name == "L3 onnx-int8"


def test_loyalty_limit_beside_budget_and_drop():
    """--min-loyalty: a point deciding unlike the predecessor is no choice, however good its score;
    unknown loyalty never meets a limit; the closest point counts the shortfall like an excess."""
    pts = [Point(6, "torch", 0.90, 0.010, 0.0, 1.0), Point(4, "onnx", 0.895, 0.004, 0.005, 0.93),
           Point(4, "onnx-int8", 0.89, 0.003, 0.01, 0.985), Point(3, "onnx", 0.90, 0.002, 0.0, None)]
    assert pts[decide(pts, 0.005, 0.01).choice].name == "L3 onnx"            # no limit: loyalty is not asked
    d = decide(pts, 0.005, 0.01, 0.95)
    assert pts[d.choice].name == "L4 onnx-int8" and d.min_loyalty == 0.95    # L3: unknown, L4 onnx: 0.93
    d = decide(pts, 0.005, 0.01, 0.99)
    assert d.choice is None and pts[d.closest].name == "L4 onnx-int8"        # 0.005 short of 0.01 left: 0.5; L6: 100% over budget
    msg = nothing_message(pts, d, "p99")
    assert "loyalty >= 0.99" in msg and "loyalty 0.9850 < 0.99" in msg


@pytest.mark.parametrize("text,seconds", [("5ms", 0.005), ("0.005s", 0.005), ("500us", 0.0005), ("5 ms", 0.005),
                                          ("2.5e-3s", 0.0025), ("500µs", 0.0005)])
def test_latency_budget_parsing(text, seconds):
    assert parse_latency(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", "5m", "5 min", "ms", "-5ms", "0ms", "5msec", "five ms"])
def test_latency_budget_bad_units(text):
    with pytest.raises(UsageError, match="--latency-budget"):
        parse_latency(text)


def test_shape_and_depths_parsing():
    assert parse_shape("1x128") == (1, 128) and parse_shape("8X32") == (8, 32)
    with pytest.raises(UsageError):
        parse_shape("1x")
    assert parse_depths(None, 6) == [6, 4, 3, 2]
    assert parse_depths("3,1", 6) == [6, 3, 1]      # the predecessor is always a candidate
    with pytest.raises(UsageError, match="between 1 and"):
        parse_depths("7", 6)


def test_progress_estimates_from_finished_stages():
    t = [0.0]
    p = Progress([("compress", "L4"), ("eval", "L4"), ("compress", "L2"), ("eval", "L2")], clock=lambda: t[0])
    assert "remaining ? + 2 compress not yet timed + 2 eval not yet timed" in p.line(0)
    for i, now in ((0, 100.0), (1, 110.0)):
        p.start(i)
        t[0] = now
        p.finish(i)
    line = p.line(2)
    assert "compress L2" in line and "elapsed 0:01:50" in line and "remaining ~0:01:50" in line


# ------------------------------------------------------------------ a whole sweep on a tiny model
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweepdata")
    data = ["--task", "custom", "--train-file", write_toy(d / "train.csv", 256, 0),
            "--validation-file", write_toy(d / "dev.csv", 64, 1), "--text-columns", "text", "--label-column", "label"]
    base = make_tiny_model(d / "base", "bert", 4)
    pred = d / "pred"
    r = CliRunner().invoke(cli, ["finetune", "--model", str(base), *data, "--output", str(pred), "--lr", "1e-3",
                                 "--max-steps", "30", "--batch-size", "16", "--max-seq-length", "16"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return pred, data


FAST = ["--depths", "4,2", "--backends", "torch,onnx", "--max-steps", "6", "--batch-size", "16",
        "--max-seq-length", "16", "--latency-shape", "1x16", "--iterations", "4", "--rounds", "2",
        "--min-seconds", "0", "--warmup", "1", "--threads", "1"]


def args(setup, out, *extra):
    pred, data = setup
    return ["sweep", "--model", str(pred), *data, "--output", str(out), *FAST, *extra]


def cfg_from(argv):
    """The SweepConfig the CLI would build (for the library entry point)."""
    holder = {}
    from theseus_deploy.sweep import command

    orig = command.sweep.callback
    command.sweep.callback = lambda **kw: holder.update(kw)
    try:
        CliRunner().invoke(cli, argv, catch_exceptions=False)
    finally:
        command.sweep.callback = orig
    return SweepConfig.of(**holder)


def kill_after(argv, out, stage, what, timeout=600):
    """Run `theseus-deploy sweep` in a real process and SIGKILL it as soon as stages.jsonl records
    (stage, what) finished; returns the stages it logged."""
    proc = subprocess.Popen([sys.executable, "-m", "theseus_deploy", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    log = out / "stages.jsonl"
    try:
        t0 = time.time()
        while time.time() - t0 < timeout:
            lines = log.read_text().splitlines() if log.is_file() else []
            if any((json.loads(x)["stage"], json.loads(x)["what"]) == (stage, what) for x in lines if x.strip()):
                proc.send_signal(signal.SIGKILL)
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.02)
        else:
            raise AssertionError(f"{stage} {what} did not finish within {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return [(json.loads(x)["stage"], json.loads(x)["what"]) for x in log.read_text().splitlines() if x.strip()]


ORDER = [("eval", "L4"), ("export", "L4 onnx"), ("compress", "L2"), ("eval", "L2"), ("export", "L2 onnx"), ("latency", "1x16")]


def test_killed_sweep_resumes_and_redecides_without_retraining(setup, tmp_path):
    out = tmp_path / "s"
    argv = args(setup, out, "--latency-budget", "10s")
    # stages: eval L4, export L4 onnx, compress L2, eval L2, export L2 onnx, latency: killed after compress L2
    before = kill_after(argv, out, "compress", "L2")
    assert before == ORDER[:len(before)] and len(before) >= 3
    weights = out / "L2" / "model" / "model.safetensors"
    assert weights.is_file() and not (out / "sweep.json").exists()
    mtime = weights.stat().st_mtime_ns

    cfg = cfg_from(argv)
    rec = run_sweep(cfg, show_progress=False)
    reused = [(s["stage"], s["what"]) for s in rec["stages"] if s["reused"]]
    assert reused == before  # every stage the killed run finished, and only those
    log = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["what"]) for x in log] == ORDER
    assert weights.stat().st_mtime_ns == mtime
    report = (out / "report.md").read_text()

    r = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rec2 = json.loads((out / "sweep.json").read_text())
    assert all(s["reused"] for s in rec2["stages"]) and (out / "report.md").read_text() == report
    assert weights.stat().st_mtime_ns == mtime

    # the same sweep never killed gives the same points and scores
    full = run_sweep(cfg_from(args(setup, tmp_path / "full", "--latency-budget", "10s")), show_progress=False)
    assert [(p["layers"], p["backend"], p["score"]) for p in full["points"]] == \
           [(p["layers"], p["backend"], p["score"]) for p in rec["points"]]

    # another budget re-decides from what is there: nothing retrained or re-timed; exit 3 names the closest
    r = CliRunner().invoke(cli, args(setup, out, "--latency-budget", "1us"), catch_exceptions=False)
    assert r.exit_code == 3, r.output
    err = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "closest: L" in err[0] and "over budget" in err[0]
    rec3 = json.loads((out / "sweep.json").read_text())
    assert all(s["reused"] for s in rec3["stages"]) and weights.stat().st_mtime_ns == mtime
    assert rec3["decision"]["choice"] is None and not (out / "best").exists()
    assert [p.get("latency_s") for p in rec3["points"]] == [p.get("latency_s") for p in rec2["points"]]


def test_outputs_and_best_loads_with_text_classifier(setup, tmp_path):
    from theseus_deploy.runtime import TextClassifier

    out = tmp_path / "s"
    r = CliRunner().invoke(cli, args(setup, out, "--latency-budget", "10s", "--max-task-drop", "1"),
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "sweep.json").read_text())
    assert {(p["layers"], p["backend"]) for p in rec["points"]} == {(4, "torch"), (4, "onnx"), (2, "torch"), (2, "onnx")}
    for name in ("sweep.csv", "report.md", "pareto.png", "best/manifest.json"):
        assert (out / name).is_file(), name
    assert len((out / "sweep.csv").read_text().splitlines()) == 5
    front = [p for p in rec["points"] if p.get("on_frontier")]
    chosen = [p for p in rec["points"] if p.get("chosen")]
    assert front and len(chosen) == 1 and chosen[0]["on_frontier"]
    # everything is within a 10 s budget and a drop of 1: the choice is the best score
    assert chosen[0]["score"] == max(p["score"] for p in rec["points"] if p.get("candidate"))
    pred_torch = next(p for p in rec["points"] if p["layers"] == 4 and p["backend"] == "torch")
    assert "vs_predecessor_torch_fp32" not in pred_torch
    succ = next(p for p in rec["points"] if p["layers"] == 2 and p["backend"] == "onnx")
    assert succ["vs_predecessor_torch_fp32"]["rounds"] == 2 and "vs_predecessor_same_backend" in succ

    manifest = json.loads((out / "best" / "manifest.json").read_text())
    backend = manifest["backend"]
    assert backend == chosen[0]["backend"] and manifest["sweep"]["layers"] == chosen[0]["layers"]
    clf = TextClassifier.load(str(out / "best"), backend=backend)
    ref = TextClassifier.load(chosen[0]["run"], backend=backend)
    texts = ["the movie was great fun", "a dull plot"]
    assert [x["label"] for x in clf(texts)] == [x["label"] for x in ref(texts)]
    assert clf(texts)[0]["score"] == pytest.approx(ref(texts)[0]["score"], abs=1e-6)

    # real traffic from the same DIR: only the timing stage runs, per-request latencies of dev sentences
    r = CliRunner().invoke(cli, args(setup, out, "--traffic", "--traffic-samples", "8", "--latency-budget", "10s"),
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "sweep.json").read_text())
    assert [s["stage"] for s in rec["stages"] if not s["reused"]] == ["latency"]
    assert rec["mode"]["kind"] == "traffic" and rec["requests_per_round"] == 8
    assert all(p["latency_s"]["n"] == 16 for p in rec["points"])      # 8 requests x 2 rounds
    assert (out / "latency-1x16.json").is_file() and (out / "latency-traffic.json").is_file()


@pytest.mark.parametrize("extra,msg", [
    (["--latency-budget", "5m"], "--latency-budget takes"),
    (["--latency-budget", "5"], "--latency-budget takes"),
    (["--backends", "torch,nope"], "unknown backend 'nope'"),
    (["--latency-shape", "1by128"], "--latency-shape"),
    (["--depths", "9"], "--depths must be between 1 and"),
    (["--max-task-drop", "2"], "--max-task-drop must be"),
])
def test_bad_input_exit_2_nothing_written(setup, tmp_path, extra, msg):
    out = tmp_path / "s"
    r = CliRunner().invoke(cli, args(setup, out, *extra))
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output and not out.exists()


def test_other_settings_refused_overwrite_starts_over(setup, tmp_path):
    out = tmp_path / "s"
    kill_after(args(setup, out), out, "eval", "L4")
    r = CliRunner().invoke(cli, args(setup, out, "--seed", "7"))
    assert r.exit_code == 2 and "--seed 42 -> 7" in r.output and (out / "L4" / "eval.json").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    r = CliRunner().invoke(cli, args(setup, tmp_path / "mine", "--overwrite"))
    assert r.exit_code == 2 and "not a sweep folder" in r.output and (tmp_path / "mine" / "keep.txt").is_file()
    (out / "L4" / "mark").write_text("from the seed-42 sweep")
    rec = run_sweep(cfg_from(args(setup, out, "--seed", "7", "--overwrite")), show_progress=False)
    assert not any(s["reused"] for s in rec["stages"]) and not (out / "L4" / "mark").exists()
    assert json.loads((out / "sweep-config.json").read_text())["seed"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.")]  # no .s.old-* left behind


# ------------------------------------------------------------------ DIR through io; damaged resume state
def sweep_cli(argv):
    return subprocess.run([sys.executable, "-m", "theseus_deploy", *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


def one_error(r, match):
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and lines[-1].startswith("error:") and match in lines[-1], r.stderr[-3000:]


def tree(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "s"
    r = CliRunner().invoke(cli, args(setup, out, "--latency-budget", "10s"), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def test_dir_holds_the_run_config_of_the_last_decision(setup, finished):
    """run_config.json beside sweep.json: the resolved configuration of the run that decided last."""
    pred, _ = setup
    cfg = json.loads((finished / "run_config.json").read_text())
    assert cfg["command"] == "sweep" and cfg["model"] == str(pred) and cfg["output"] == str(finished)
    assert (cfg["depths"], cfg["backends"], cfg["latency_shape"], cfg["latency_budget"]) == ("4,2", "torch,onnx", "1x16", "10s")
    assert (cfg["max_steps"], cfg["batch_size"], cfg["max_seq_length"], cfg["threads"]) == (6, 16, 16, 1)
    assert cfg["epochs"] == 1.0 and cfg["int8"]["reduce_range"] is None  # the sweep's defaults, export's group
    assert cfg == {**json.loads((finished / "sweep.json").read_text())["config"], "command": "sweep"}


def test_overwrite_never_deletes_the_model_inside_dir(setup, finished, tmp_path):
    """--model DIR/best with --overwrite: refused, DIR untouched (it would have been wiped)."""
    out = tmp_path / "s"
    shutil.copytree(finished, out)
    before = tree(out)
    pred, data = setup
    argv = ["sweep", "--model", str(out / "best"), *data, "--output", str(out), *FAST, "--depths", "2", "--overwrite"]
    one_error(sweep_cli(argv), "would replace")
    assert tree(out) == before


def test_a_second_live_sweep_on_dir_is_refused(setup, tmp_path):
    code = ("import sys, time; from theseus_deploy.io import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)\n")
    out = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_error(sweep_cli(args(setup, out)), f"another run is writing {out} (pid {holder.pid})")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_loyalty_recorded_and_a_limit_redecides_without_rescoring(setup, finished, tmp_path):
    """Every point's loyalty to the predecessor (label, probability) is in sweep.json, sweep.csv and
    report.md, computed from the dev logits the stages keep: --min-loyalty re-decides from a finished
    sweep without scoring, training or timing again."""
    out = tmp_path / "s"
    shutil.copytree(finished, out)
    rec = json.loads((out / "sweep.json").read_text())
    by = {(p["layers"], p["backend"]): p for p in rec["points"]}
    assert by[(4, "torch")]["loyalty"]["label"] == 1.0 and by[(4, "torch")]["loyalty"]["probability"] == pytest.approx(1.0)
    assert by[(4, "onnx")]["loyalty"]["label"] == 1.0                        # the fp32 graph of the predecessor
    succ = by[(2, "torch")]["loyalty"]
    assert 0.0 <= succ["label"] <= 1.0 and 0.0 <= succ["probability"] <= 1.0
    assert "dev_logits" not in by[(2, "torch")] and len(json.loads((out / "L2" / "eval.json").read_text())["dev_logits"]) == 64
    header = (out / "sweep.csv").read_text().splitlines()[0].split(",")
    assert header[5] == "loyalty"
    assert "| loyalty |" in (out / "report.md").read_text()
    weights = out / "L2" / "model" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    r = CliRunner().invoke(cli, args(setup, out, "--latency-budget", "10s", "--max-task-drop", "1",
                                     "--min-loyalty", "1"), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "sweep.json").read_text())
    assert all(s["reused"] for s in rec["stages"]) and weights.stat().st_mtime_ns == mtime
    assert rec["decision"]["min_loyalty"] == 1.0


def test_a_loyalty_limit_excludes_a_point_that_decides_otherwise_than_the_predecessor(setup, finished, tmp_path):
    """The tiny successors decide like their predecessor on every dev row, so here the 2-layer PyTorch
    point's kept dev logits are made to disagree on 8 of 64 rows (columns swapped; its kept score is
    left as it is): re-deciding reads its label loyalty as 56/64 from them, and --min-loyalty 0.9
    takes it out of the candidates that it is one of without the limit."""
    out = tmp_path / "s"
    shutil.copytree(finished, out)
    ev = json.loads((out / "L2" / "eval.json").read_text())
    ev["dev_logits"] = [row[::-1] if i < 8 else row for i, row in enumerate(ev["dev_logits"])]
    (out / "L2" / "eval.json").write_text(json.dumps(ev))

    def decide(*extra):
        r = CliRunner().invoke(cli, args(setup, out, "--latency-budget", "10s", "--max-task-drop", "1", *extra),
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        rec = json.loads((out / "sweep.json").read_text())
        assert all(s["reused"] for s in rec["stages"])
        return rec, next(p for p in rec["points"] if (p["layers"], p["backend"]) == (2, "torch"))

    rec, l2 = decide()
    assert l2["loyalty"]["label"] == pytest.approx(56 / 64) and l2["meets"]
    rec, l2 = decide("--min-loyalty", "0.9")
    assert not l2["meets"] and not l2.get("chosen")
    assert all(p["loyalty"]["label"] >= 0.9 for p in rec["points"] if p["meets"])
    assert any(p["meets"] for p in rec["points"]) and rec["decision"]["min_loyalty"] == 0.9


def test_a_sweep_from_before_an_option_existed_redecides_without_rescoring(setup, finished, tmp_path):
    """A sweep folder written before --distill-alpha/--distill-temperature existed (its settings lack
    them) is the sweep those options' defaults give: a new budget re-decides from it, every stage
    reused (it was refused as "holds a sweep with other settings (--distill-alpha None -> 0.0 ...)")."""
    out = tmp_path / "s"
    shutil.copytree(finished, out)
    state = json.loads((out / "sweep-config.json").read_text())
    del state["distill_alpha"], state["distill_temperature"]
    (out / "sweep-config.json").write_text(json.dumps(state))
    lat = json.loads((out / "latency-1x16.json").read_text())
    del lat["settings"]["deciding"]["distill_alpha"], lat["settings"]["deciding"]["distill_temperature"]
    (out / "latency-1x16.json").write_text(json.dumps(lat))
    r = CliRunner().invoke(cli, args(setup, out, "--latency-budget", "20s"), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "sweep.json").read_text())
    assert all(st["reused"] for st in rec["stages"]), rec["stages"]
    assert json.loads((out / "sweep-config.json").read_text())["distill_alpha"] == 0.0
    r = CliRunner().invoke(cli, args(setup, out, "--distill-alpha", "0.5"))  # KD is another sweep
    assert r.exit_code == 2 and "--distill-alpha 0.0 -> 0.5" in r.output, r.output


DAMAGED = [
    ("L4/eval.json", "{not json"),
    ("L4/eval.json", json.dumps({"layers": 4, "metrics": {"score": 0.5}, "dev_logits": [[0.1, 0.2], [0.3]]})),
    ("L4/eval.json", json.dumps({"layers": 4, "metrics": {"score": "high"}})),
    ("L2/onnx.json", json.dumps(["a", "list"])),
    ("L2/onnx.json", json.dumps({"metrics": None})),
    ("sweep-config.json", "\x00\x01"),
    ("latency-1x16.json", json.dumps({"settings": {}, "environment": {}, "points": {"L4|torch": {"latency": {}}}})),
    ("L2/model/metrics.json", "{"),
]


def test_damaged_stage_files_are_refused_naming_them(setup, finished, tmp_path):
    """Resume state edited or damaged after the fact (invalid JSON, wrong types): one error line naming the
    file, nothing changed. The cases run as parallel processes (each its own copy of a finished sweep)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = []
    for i, (file, damage) in enumerate(DAMAGED):
        out = tmp_path / f"s{i}"
        shutil.copytree(finished, out)
        (out / file).write_text(damage)
        cases.append((out, file, tree(out)))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: sweep_cli(args(setup, c[0], "--latency-budget", "10s")), cases))
    for (out, file, before), r in zip(cases, results):
        one_error(r, f"{out / file}: damaged sweep stage file")
        assert tree(out) == before, file


def test_f1_scores_the_positive_class_of_a_model_with_another_label_order(tmp_path, synthetic_glue):
    """MRPC's F1 is that of `equivalent`. For a model that calls `equivalent` id 0 the sweep scored
    F1 on id 1 (`not_equivalent`): L2/eval.json said f1 0.0 where evaluate gave 0.667 on the same rows."""
    from theseus_deploy.config import EvaluateConfig
    from theseus_deploy.recipes.evaluate import run_evaluate

    model = str(make_tiny_model(tmp_path / "m", "bert", 2, seed=3, labels=("equivalent", "not_equivalent")))
    data = ["--task", "mrpc", "--data-dir", str(synthetic_glue), "--max-seq-length", "32"]
    ev = run_evaluate(EvaluateConfig.of(model=model, task="mrpc", data_dir=str(synthetic_glue), max_seq_length=32))
    assert ev["metrics"]["f1"] > 0  # this model's F1 of `not_equivalent` (what was scored) is 0.0
    r = CliRunner().invoke(cli, ["sweep", "--model", model, *data, "--output", str(tmp_path / "s"), "--depths", "2",
                                 "--backends", "torch", "--latency-shape", "1x16", "--iterations", "2", "--rounds", "1",
                                 "--min-seconds", "0", "--warmup", "1", "--threads", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / "L2" / "eval.json").read_text())["metrics"] == ev["metrics"]
