"""Several REAL processes on CPU (gloo): torchrun, accelerate launch and an mpirun-style launch
(Open MPI's variables, no RANK), on tiny models and toy CSV data (docs/distributed.md).

Each launch costs a few seconds of imports per process, so the launches are shared: one finetune
(dropout off: 2 processes x batch 4 against 1 process x batch 8), one uninterrupted compress, one
compress killed with SIGKILL once its checkpoint exists and then resumed, one refused resume with
another process count, one distributed evaluate. Dev sets are not multiples of the eval batch (8):
44 rows (6 batches, the last of 4: before, gloo aborted with "Received data size doesn't match")
and 37 rows (5 batches: rank 1 got a padding copy of batch 0).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import theseus_deploy
from conftest import make_tiny_model
from test_train import write_toy
from theseus_deploy.cli import cli

CODE = Path(theseus_deploy.__file__).resolve().parents[1]  # the launched processes run the code under test

EVAL_BATCH = 8
# launcher variables of the pytest process itself must not leak into the launches
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARS and not k.startswith(("OMPI_", "PMI_", "MV2_", "ACCELERATE_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(CODE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               ACCELERATE_USE_CPU="true", **extra)
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "theseus_deploy"]


def _accelerate():
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_port()), "-m", "theseus_deploy"]


def _stop(proc: subprocess.Popen):
    """Kill what a launch left, by PID: the launcher's workers (torchrun starts them in their own
    sessions, so killing the launcher would not reach them), then the launcher."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for k in kids:
        try:
            os.kill(k.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def launch(cmd, timeout=150, **env) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _stop(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(r: subprocess.CompletedProcess):
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def _weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def _evaluate(model, data, batch=EVAL_BATCH) -> dict:
    """One process, in this process: the reference score."""
    r = CliRunner().invoke(cli, ["evaluate", "--model", str(model), *data, "--max-seq-length", "16",
                                 "--batch-size", str(batch), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def _log(folder) -> list[dict]:
    recs = [json.loads(line) for line in (Path(folder) / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in rec.items() if k != "elapsed_s"} for rec in recs]


def _whole(metrics: dict, rows: int) -> bool:
    """Whether accuracy x rows is a whole number (it is when exactly `rows` rows were scored)."""
    return abs(metrics["accuracy"] * rows - round(metrics["accuracy"] * rows)) < 1e-9


def _data(root, dev_rows):
    return ["--task", "custom", "--train-file", write_toy(root / "train.csv", 64, 0),
            "--validation-file", write_toy(root / f"dev{dev_rows}.csv", dev_rows, 1), "--text-columns", "text",
            "--label-column", "label"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _data(tmp_path_factory.mktemp("mpdata"), 44)


@pytest.fixture(scope="module")
def data37(tmp_path_factory):
    return _data(tmp_path_factory.mktemp("mpdata37"), 37)


def _no_dropout(folder: Path) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ============================================================== finetune: 2 x b == 1 x 2b, exact dev
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("mpft")
    base = _no_dropout(make_tiny_model(root / "base", "bert", 2))
    common = ["finetune", "--model", str(base), *data, "--max-seq-length", "16", "--lr", "1e-3", "--max-steps", "8",
              "--eval-steps", "8", "--log-steps", "1", "--eval-batch-size", str(EVAL_BATCH), "--seed", "3"]
    two = launch(TORCHRUN + common + ["--batch-size", "4", "--output", str(root / "two")])
    r = CliRunner().invoke(cli, [*common, "--batch-size", "8", "--output", str(root / "one")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return base, root / "one", root / "two", _ok(two)


def test_two_processes_equal_one_process_with_twice_the_batch(finetuned):
    """Gradient averaging is exact: 2 processes x batch 4 = 1 process x batch 8 (dropout off; the
    only difference is per-batch padding, float noise); --max-steps counts global steps."""
    base, one, two, _ = finetuned
    w0, w1, w2 = _weights(base), _weights(one), _weights(two)
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1 if k in w0)
    assert moved > 1e-3
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert json.loads((two / "run_config.json").read_text())["num_processes"] == 2
    assert json.loads((two / "run_config.json").read_text())["total_steps"] == 8
    l1, l2 = _log(one), _log(two)
    assert [h["step"] for h in l1] == [h["step"] for h in l2]
    # the logged loss is the mean over the ranks' batches: the one-process loss of the same examples
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(l1, l2) if "loss" in a)


def test_distributed_dev_score_is_exact(finetuned, data):
    """44 dev rows, eval batch 8, 2 processes: no gloo size mismatch, no padded duplicates, the
    score of a one-process evaluate of the saved model."""
    _, _, two, r = finetuned
    dev = json.loads((two / "metrics.json").read_text())["dev"]
    assert _whole(dev, 44)
    assert dev == _evaluate(two, data)["metrics"]
    # main process only: one result table, one line per event
    assert r.stdout.count("finetuned (2 layers)") == 1
    assert r.stderr.count("train / 44 dev examples") == 1


def test_mpirun_style_launch_evaluates_once_and_locks_on_rank_0(finetuned, data, tmp_path):
    """Open MPI's variables and no RANK (what mpirun gives before accelerate runs): before, both
    processes raced for the output lock and one exited 2; now the process group is started first,
    rank 0 alone holds the lock and writes, the rows are shared between the ranks."""
    _, _, two, _ = finetuned
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "theseus_deploy", "evaluate", "--model", str(two), *data, "--max-seq-length", "16",
           "--batch-size", str(EVAL_BATCH), "--output", str(out), "--json"]
    port, procs = str(_port()), []
    try:
        for rank in (0, 1):
            env = _env(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
                       OMPI_COMM_WORLD_LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          start_new_session=True))
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            _stop(p)
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se[-3000:]
    written = json.loads(out.read_text())
    assert written["num_processes"] == 2 and written["num_examples"] == 44
    assert written["metrics"] == _evaluate(two, data)["metrics"]
    assert json.loads(results[0][0])["metrics"] == written["metrics"] and results[1][0] == ""
    assert not (tmp_path / ".eval.json.lock").exists()


# ============================================================== compress: kill -9, resume, refusal
COMPRESS = ["--successor-layers", "2", "--max-seq-length", "16", "--batch-size", "4", "--max-steps", "16",
            "--eval-steps", "8", "--save-steps", "4", "--log-steps", "1", "--eval-batch-size", str(EVAL_BATCH),
            "--lr", "1e-3", "--seed", "5"]


@pytest.fixture(scope="module")
def compress_runs(tmp_path_factory, data37):
    """An uninterrupted 2-process compress (accelerate launch) and one killed with SIGKILL (torchrun
    workers, by PID) once its first checkpoint exists; dropout on."""
    root = tmp_path_factory.mktemp("mpc")
    pred = make_tiny_model(root / "pred", "bert", 4)
    args = ["compress", "--model", str(pred), *data37, *COMPRESS]
    full = launch(_accelerate() + args + ["--output", str(root / "full")])

    out = root / "killed"
    ckpt = out.with_name("killed.partial") / "checkpoint.pt"
    log = open(root / "killed.stderr", "w+")  # a file, not a pipe nobody reads while we wait
    proc = subprocess.Popen(TORCHRUN + args + ["--output", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=log, text=True, start_new_session=True)
    killed = []
    try:
        deadline = time.time() + 150
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        try:
            workers = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:  # the launcher ended before any checkpoint: a crash, reported below
            workers = []
        for k in workers:  # kill -9
            try:
                os.kill(k.pid, signal.SIGKILL)
                killed.append(k.pid)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
    finally:
        _stop(proc)
        log.seek(0)
        err = log.read()
        log.close()
    assert killed and ckpt.exists(), err[-3000:]
    assert not out.exists(), "the run ended before it was killed"
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 16
    spare = root / "spare"  # the same checkpoint, for the refused resume
    shutil.copytree(ckpt.parent, spare.with_name("spare.partial"))
    return pred, args, _ok(full), root / "full", out, spare, step


def test_compress_dev_scores_are_exact(compress_runs, data37):
    """The predecessor score compress computes first and the successor's, on 37 rows under 2 processes,
    are those of a one-process evaluate."""
    pred, _, full, out, *_ = compress_runs
    m = json.loads((out / "metrics.json").read_text())
    assert m["predecessor_dev"] == _evaluate(pred, data37)["metrics"]
    assert m["dev"] == _evaluate(out, data37)["metrics"]
    assert _whole(m["dev"], 37) and _whole(m["predecessor_dev"], 37)
    assert full.stdout.count("retention:") == 1 and full.stderr.count("predecessor (4 layers) dev") == 1


def test_resume_after_kill_9_is_bit_identical(compress_runs):
    """Every rank's RNG (dropout) and the shared draw generator restored: the resumed 2-process run
    ends bit-identical to the uninterrupted one, loss for loss."""
    _, args, _, full, out, _, step = compress_runs
    r = _ok(launch(TORCHRUN + args + ["--output", str(out), "--resume"]))
    assert f"resumed from {out}.partial/checkpoint.pt at step {step}" in r.stderr
    a, b = _weights(full), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _log(full) == _log(out)
    assert not out.with_name(out.name + ".partial").exists()


def test_resume_with_another_process_count_is_refused(compress_runs):
    _, args, *_, spare, _ = compress_runs
    ckpt = spare.with_name("spare.partial") / "checkpoint.pt"
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    r = launch([sys.executable, "-m", "theseus_deploy", *args, "--output", str(spare), "--resume"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: --resume: the checkpoint was written by a run of 2 processes, this run has 1")
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before and not spare.exists()


# ============================================================== rank decisions (no launch)
@pytest.mark.parametrize("env, rank", [
    ({"RANK": "1"}, 1),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, 1),   # Open MPI, before accelerate sets RANK
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, 1),                           # Intel MPI / MPICH
    ({"MV2_COMM_WORLD_RANK": "1"}, 1),                                 # MVAPICH
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, 0),                   # plain srun: independent runs, each locks
    ({}, 0),
])
def test_rank_before_the_process_group_exists(monkeypatch, env, rank):
    from theseus_deploy import dist
    from theseus_deploy.io import _rank

    for k in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "WORLD_SIZE", "PMI_SIZE",
              "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dist.rank() == rank and _rank() == rank


def test_deal_pads_training_but_not_evaluation():
    from theseus_deploy import dist

    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert [dist.deal(batches, 2, r, padded=False) for r in (0, 1)] == [[[0, 1], [4, 5], [8]], [[2, 3], [6, 7]]]
    assert [dist.deal(batches, 2, r, padded=True) for r in (0, 1)] == [[[0, 1], [4, 5], [8]],
                                                                      [[2, 3], [6, 7], [0, 1]]]
    assert dist.deal(batches, 1, 0, padded=True) == batches


def test_a_launch_accelerate_cannot_distribute_is_refused(monkeypatch):
    """torchrun on a machine without GPUs and without ACCELERATE_USE_CPU: accelerate gives each of the
    N processes a one-process state (N independent runs on one output); refused with one line."""
    from theseus_deploy import dist
    from theseus_deploy.errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="launched as 2 processes .* ACCELERATE_USE_CPU=true"):
        dist.check_world(1)
    dist.check_world(2)
    monkeypatch.delenv("WORLD_SIZE")
    dist.check_world(1)
