"""`theseus-deploy loadtest URL...`: closed-loop load with real dev-set texts, loopback only.

Each level runs C client threads; each thread sends one text per request (KServe v2 JSON over a
kept-alive HTTP connection) and sends the next as soon as the answer is back, until the level's
request count or time limit is reached. Several servers are loaded in turn, level by level and
round by round (interleaved), so a slow phase of a shared machine hits all of them; ratios
against the first server are medians of per-round ratios. The client shares the CPU with the
servers: requests/s here are those of the whole machine, client included.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from theseus_deploy import config as C
from theseus_deploy.bench.api import parse_ints, repeated
from theseus_deploy.bench.env import environment
from theseus_deploy.data import load_task
from theseus_deploy.errors import UsageError
from theseus_deploy.io import atomic_output_dir, check_output_dir, locks_output, write_json

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_url(url: str) -> tuple[str, int]:
    u = urlparse(url if "://" in url else f"http://{url}")
    if u.scheme != "http" or not u.hostname:
        raise UsageError(f"URL must look like http://127.0.0.1:8000, got '{url}'")
    if u.hostname not in LOOPBACK:
        raise UsageError(f"loadtest targets loopback only (127.0.0.1, localhost, ::1), got host '{u.hostname}'")
    if u.path not in ("", "/") or u.query or u.fragment:
        raise UsageError(f"URL '{url}': give the server's address only (http://HOST:PORT); the load test sends "
                         f"to /v2/models/<--model-name>/infer itself")
    try:
        port = u.port  # ValueError for a port that is not a number or beyond 65535
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise UsageError(f"URL '{url}': the port must be a number from 1 to 65535")
    return u.hostname, port or 80


def infer_body(text: str) -> bytes:
    return json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [text]}]}).encode()


def run_level(host: str, port: int, model: str, texts: list[str], concurrency: int, max_requests: int,
              max_seconds: float, timeout: float) -> dict:
    """One closed-loop level: C threads until max_requests answers or max_seconds; latencies of every request."""
    path = f"/v2/models/{model}/infer"
    lock = threading.Lock()
    state = {"next": 0}
    lat, errors, statuses = [], [], {}
    deadline = time.perf_counter() + max_seconds

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        while True:
            with lock:
                i = state["next"]
                if i >= max_requests or time.perf_counter() >= deadline:
                    break
                state["next"] += 1
            body = infer_body(texts[i % len(texts)])
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                dt = time.perf_counter() - t0
                ok = resp.status == 200 and b'"label"' in data
                with lock:
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    (lat.append(dt) if ok else errors.append(f"{resp.status}: {data[:200]!r}"))
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.asarray(lat) if lat else np.asarray([np.nan])
    return {"concurrency": concurrency, "requests": len(lat) + len(errors), "ok": len(lat), "errors": len(errors),
            "error_samples": errors[:5], "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "seconds": wall, "requests_s": len(lat) / wall if wall > 0 else 0.0,
            "latency_ms": {"mean": float(np.mean(a) * 1000), "p50": float(np.percentile(a, 50) * 1000),
                           "p90": float(np.percentile(a, 90) * 1000), "p99": float(np.percentile(a, 99) * 1000),
                           "max": float(np.max(a) * 1000)}}


def load_texts(task: str, data_dir: str | None, max_samples: int | None) -> list[str]:
    data = load_task(task, data_dir, "dev", max_samples)
    if any(t[1] is not None for t in data.texts):
        raise UsageError(f"--task {task} has sentence pairs; the served model takes one text per request")
    return [t[0] for t in data.texts]


def server_stats(host: str, port: int, model: str, name: str = "") -> dict | None:
    """Triton's batch statistics (inference vs execution counts); None when the endpoint is not open
    to us (not 200) or the server is gone. A 200 whose body is not Triton's statistics is a UsageError:
    that URL is not the Triton server the load test is meant for."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", f"/v2/models/{model}/stats")
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
    except (OSError, http.client.HTTPException):
        return None
    if resp.status != 200:
        return None
    try:
        s = json.loads(data)["model_stats"][0]
        counts = {k: s[k] for k in ("inference_count", "execution_count")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()):
            raise ValueError
        return counts
    except (ValueError, TypeError, KeyError, IndexError):
        raise UsageError(f"server {name or f'{host}:{port}'}: /v2/models/{model}/stats answered 200 but not with Triton's "
                         f"statistics (model_stats[0] with inference_count and execution_count): {data[:120]!r}") from None


# Held for the whole run, as every command's (README, one run per output): taken only to write, a second
# run on the same --output loaded the servers in full and then failed, or with --overwrite replaced the first's.
@locks_output("cfg.output", protected=lambda cfg: [cfg.data_dir])
def run_loadtest(cfg) -> dict:
    if not cfg.urls:
        raise UsageError("give at least one server URL (e.g. http://127.0.0.1:8000)")
    targets = [check_url(u) for u in cfg.urls]
    if cfg.names and len(cfg.names) != len(cfg.urls):
        raise UsageError(f"--name: give one per URL ({len(cfg.urls)}), got {len(cfg.names)}")
    names = list(cfg.names) or [f"{h}:{p}" for h, p in targets]
    # Rows are keyed by name: two equal names (a URL given twice without --name) merged two servers' rows.
    twice = repeated(names)
    if twice and cfg.names:
        raise UsageError(f"--name {', '.join(twice)} is given twice: give each server its own name")
    if twice:
        raise UsageError(f"{', '.join(twice)} is the same server twice: give each URL once, or a --name per URL")
    levels = parse_ints(cfg.concurrency, "--concurrency")
    if max(levels) > 512:
        raise UsageError(f"--concurrency: at most 512 clients, got {max(levels)}")
    check_output_dir(cfg.output, cfg.overwrite, protected=[cfg.data_dir])
    texts = load_texts(cfg.task, cfg.data_dir, cfg.max_eval_samples)
    for (h, p), name in zip(targets, names):  # every server answers before anything is timed
        r = run_level(h, p, cfg.model_name, texts, 1, 1, cfg.timeout, cfg.timeout)
        if r["errors"]:
            raise UsageError(f"server {name} ({h}:{p}) did not answer an inference: {r['error_samples'][0]}")
        server_stats(h, p, cfg.model_name, name)  # a stats reply of the wrong shape: refused before anything is timed
    runs = []
    t_start = time.time()
    for rnd in range(cfg.rounds):
        for c in levels:
            for (h, p), name in zip(targets, names):
                if cfg.warmup:
                    run_level(h, p, cfg.model_name, texts, c, cfg.warmup, cfg.seconds, cfg.timeout)
                before = server_stats(h, p, cfg.model_name, name)
                r = run_level(h, p, cfg.model_name, texts, c, cfg.requests, cfg.seconds, cfg.timeout)
                after = server_stats(h, p, cfg.model_name, name)
                if before and after and after["execution_count"] > before["execution_count"]:
                    r["mean_batch"] = ((after["inference_count"] - before["inference_count"])
                                       / (after["execution_count"] - before["execution_count"]))
                runs.append({"server": name, "url": cfg.urls[names.index(name)], "round": rnd, **r})
                print(f"round {rnd} c={c:<3} {name:<24} {r['requests_s']:8.1f} req/s  p50 {r['latency_ms']['p50']:7.1f}  "
                      f"p99 {r['latency_ms']['p99']:7.1f} ms  errors {r['errors']}", flush=True)
    results = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
               "environment": environment(), "num_texts": len(texts), "runs": runs,
               "summary": summarize(runs, names, levels), "wall_seconds": time.time() - t_start}
    with atomic_output_dir(cfg.output, cfg.overwrite, protected=[cfg.data_dir]) as tmp:
        write_json(tmp / "results.json", results)
        write_json(tmp / "run_config.json", {**C.to_dict(cfg), "command": "loadtest"})
        (tmp / "report.md").write_text(markdown(results))
        plot(results, tmp / "latency_vs_throughput.png")
    results["output"] = cfg.output
    return results


def summarize(runs: list[dict], names: list[str], levels: list[int]) -> list[dict]:
    """Per server and level: medians over rounds, errors summed, ratios vs the first server (paired by round)."""
    out = []
    for c in levels:
        ref = {r["round"]: r for r in runs if r["server"] == names[0] and r["concurrency"] == c}
        for name in names:
            sel = [r for r in runs if r["server"] == name and r["concurrency"] == c]
            row = {"server": name, "concurrency": c, "rounds": len(sel),
                   "requests_s": float(np.median([r["requests_s"] for r in sel])),
                   "p50_ms": float(np.median([r["latency_ms"]["p50"] for r in sel])),
                   "p90_ms": float(np.median([r["latency_ms"]["p90"] for r in sel])),
                   "p99_ms": float(np.median([r["latency_ms"]["p99"] for r in sel])),
                   "requests": sum(r["requests"] for r in sel), "errors": sum(r["errors"] for r in sel)}
            batches = [r["mean_batch"] for r in sel if "mean_batch" in r]
            if batches:
                row["mean_batch"] = float(np.median(batches))
            if name != names[0]:
                ratios = [r["requests_s"] / ref[r["round"]]["requests_s"] for r in sel
                          if r["round"] in ref and ref[r["round"]]["requests_s"] > 0]
                p99 = [r["latency_ms"]["p99"] / ref[r["round"]]["latency_ms"]["p99"] for r in sel if r["round"] in ref]
                if ratios:
                    row["vs_first"] = {"requests_s_ratio": float(np.median(ratios)), "min": float(min(ratios)),
                                       "max": float(max(ratios)), "p99_ratio": float(np.median(p99))}
            out.append(row)
    return out


def markdown(results: dict) -> str:
    env, cfg = results["environment"], results["config"]
    names = list(dict.fromkeys(r["server"] for r in results["summary"]))
    out = [f"# Load test: {', '.join(names)}", "",
           f"CPU {env.get('cpu')} ({env.get('logical_cores')} logical cores, flags {', '.join(env.get('cpu_flags') or []) or 'none of avx512/vnni/bf16/amx'}); "
           f"{results['num_texts']} {cfg['task']} dev texts, one per request, closed loop; per level at most "
           f"{cfg['requests']} requests or {cfg['seconds']} s after {cfg['warmup']} warm-up requests; {cfg['rounds']} "
           f"interleaved round(s), medians over rounds. The load generator runs on the same CPU.", "",
           "| server | concurrency | req/s | p50 ms | p90 ms | p99 ms | mean batch | requests | errors | req/s vs first [min-max] | p99 vs first |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        v = r.get("vs_first")
        ratio = f"{v['requests_s_ratio']:.2f}x [{v['min']:.2f}-{v['max']:.2f}]" if v else "-"
        p99 = f"{v['p99_ratio']:.2f}x" if v else "-"
        out.append(f"| {r['server']} | {r['concurrency']} | {r['requests_s']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                   f"{r['p99_ms']:.1f} | {r.get('mean_batch', float('nan')):.1f} | {r['requests']} | {r['errors']} | {ratio} | "
                   f"{p99} |")
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in dict.fromkeys(r["server"] for r in results["summary"]):
        rows = sorted((r for r in results["summary"] if r["server"] == name), key=lambda r: r["concurrency"])
        ax.plot([r["requests_s"] for r in rows], [r["p99_ms"] for r in rows], marker="o", label=f"{name} p99")
        ax.plot([r["requests_s"] for r in rows], [r["p50_ms"] for r in rows], marker=".", ls="--", label=f"{name} p50")
        for r in rows:
            ax.annotate(f"c={r['concurrency']}", (r["requests_s"], r["p99_ms"]), fontsize=7)
    ax.set_xlabel("requests/s")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("latency vs throughput (closed loop)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
