"""docs/serve.md's figures: predecessor vs successor served the same way (onnx-int8 on PyTriton's
Triton), the naive baseline (predecessor, PyTorch fp32, --max-batch-size 1: one request per
forward), start-to-ready times, a concurrency sweep and a soak. Loopback only; every server is
stopped by PID at the end, whatever happens.

    python scripts/serve_bench.py --predecessor MODEL --successor MODEL --output runs/serve-bench \
        [--soak-seconds 300] [--rounds 3] [--seconds 20]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, model: str, out: Path, *extra: str) -> dict:
    ports = [free_port() for _ in range(3)]
    log = open(out / f"server-{name}.log", "w")
    cmd = [sys.executable, "-m", "theseus_deploy", "serve", model, "--http-port", str(ports[0]), "--grpc-port",
           str(ports[1]), "--metrics-port", str(ports[2]), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{ports[0]}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server {name} exited: see {out / f'server-{name}.log'}")
        try:
            with urllib.request.urlopen(f"{url}/v2/models/text_classifier/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.1)
    ready = time.perf_counter() - t0
    print(f"{name}: ready in {ready:.1f} s at {url}", flush=True)
    return {"name": name, "proc": proc, "url": url, "ready_s": ready, "cmd": cmd}


def stop(server: dict) -> float:
    t0 = time.perf_counter()
    proc = server["proc"]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return time.perf_counter() - t0


def loadtest(urls, names, out: Path, *extra: str):
    cmd = [sys.executable, "-m", "theseus_deploy", "loadtest", *urls, *sum((["--name", n] for n in names), []),
           "--output", str(out), "--overwrite", *extra]
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads((out / "results.json").read_text())


def paired(results: dict, num: str, den: str) -> dict:
    """Median (and min-max) over rounds of num's req/s / den's req/s at the same level and round."""
    import statistics

    out = {}
    by = {(r["server"], r["concurrency"], r["round"]): r for r in results["runs"]}
    for (server, c, rnd), r in by.items():
        if server == num and (den, c, rnd) in by and by[(den, c, rnd)]["requests_s"] > 0:
            out.setdefault(c, []).append(r["requests_s"] / by[(den, c, rnd)]["requests_s"])
    return {c: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": len(v)} for c, v in out.items()}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--ratios":  # re-read a finished run: python serve_bench.py --ratios DIR/c32
        res = json.loads((Path(sys.argv[2]) / "results.json").read_text())
        names = list(dict.fromkeys(r["server"] for r in res["runs"]))
        for a in names:
            for b in names:
                if a != b:
                    print(f"{a} / {b}: {json.dumps(paired(res, a, b))}")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--predecessor", required=True)
    ap.add_argument("--successor", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--backend", default="onnx-int8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--sweep-seconds", type=float, default=10)
    ap.add_argument("--soak-seconds", type=float, default=300)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra flag for every `serve` (repeat), e.g. --server-arg=--no-http-gateway")
    args = ap.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    exports = {}
    for role, model in (("predecessor", args.predecessor), ("successor", args.successor)):
        folder = out / f"export-{role}"
        if not (folder / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "theseus_deploy", "export", "--model", model, "--format", args.backend,
                            "--output", str(folder), "--max-seq-length", "128", "--overwrite"], cwd=REPO, check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        exports[role] = str(folder.resolve())
    servers, summary = [], {}
    try:
        extra = args.server_arg
        servers.append(start("predecessor", exports["predecessor"], out, "--backend", args.backend, *extra))
        servers.append(start("successor", exports["successor"], out, "--backend", args.backend, *extra))
        servers.append(start("naive", str(Path(args.predecessor).resolve()), out, "--backend", "torch",
                             "--max-batch-size", "1", "--max-queue-delay-ms", "0", *extra))
        summary["ready_s"] = {s["name"]: s["ready_s"] for s in servers}
        urls, names = [s["url"] for s in servers], [s["name"] for s in servers]
        r32 = loadtest(urls, names, out / "c32", "--concurrency", "32", "--rounds", str(args.rounds),
                       "--seconds", str(args.seconds), "--requests", "100000", *data)
        summary["c32"] = r32["summary"]
        sweep = loadtest(urls[:2], names[:2], out / "sweep", "--concurrency", "1,4,16,64", "--seconds",
                         str(args.sweep_seconds), "--requests", "100000", *data)
        summary["sweep"] = sweep["summary"]
        if args.soak_seconds > 0:
            soak = loadtest(urls[1:2], names[1:2], out / "soak", "--concurrency", "16", "--seconds", str(args.soak_seconds),
                            "--requests", "100000000", "--warmup", "0", *data)
            summary["soak"] = soak["summary"]
    finally:
        summary["stop_s"] = {s["name"]: stop(s) for s in servers}
    summary["server_args"] = args.server_arg
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("ready_s", "stop_s")}, indent=2))


if __name__ == "__main__":
    main()
