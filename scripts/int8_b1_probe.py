"""CPU batch-1 INT8 probe: which quantisation mode and which ONNX Runtime session settings cut the
fixed per-call cost of a BERT encoder at b1 s128.

    PYTHONPATH=. python scripts/int8_b1_probe.py --model ../shared/models/bert-base-uncased \
        --layers 12 --layers 6 --work runs/int8-probe --rounds 7 [--profile]

Builds (once, cached in --work) the fused fp32 graph, dynamic INT8, and static INT8 variants
(QDQ / QOperator, Attention dynamic or fp32) calibrated on SST-2 training texts, then times every
(model, variant, session config) at each shape in interleaved rounds and prints medians and
paired ratios (predecessor / successor, per round). `--profile` writes ONNX Runtime profiles and
prints the top operators by time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def build(model: str, layers: int, work: Path, calib_n: int, seq: int, variants) -> dict:
    from theseus_deploy.config import ExportConfig
    from theseus_deploy.data import load_task
    from theseus_deploy.export.api import export_model
    from theseus_deploy.export.ort import calibration_feeds, quantize_int8_static
    from theseus_deploy.hf import build_random_classifier, load_tokenizer

    folder = work / f"L{layers}"
    src = folder / "model"
    if not (src / "config.json").is_file():
        m = build_random_classifier(model, layers, num_labels=2)
        m.save_pretrained(src)
        load_tokenizer(model).save_pretrained(src)
    art = folder / "export"
    if not (art / "model.onnx").is_file():
        export_model(ExportConfig.of(model=str(src), formats=["onnx", "onnx-int8"], output=str(art), max_seq_length=seq, validate=False))
    tok = load_tokenizer(str(src))
    names = json.loads((art / "manifest.json").read_text())["input_names"]
    feeds = None
    out = {"fp32": art / "model.onnx", "dyn": art / "model-int8.onnx"}
    for tag in variants:
        if tag in out:
            continue
        qf, _, att = tag.partition("-att")  # e.g. qdq, qop-attstatic, qdq-attfp32
        qf, att = {"qdq": "qdq", "qop": "qoperator"}[qf], att or "dynamic"
        p = folder / f"static-{tag}.onnx"
        if not p.is_file():
            if feeds is None:
                texts = load_task("sst2", None, "train", calib_n).texts
                feeds = calibration_feeds(tok, texts, names, seq)
            t0 = time.time()
            quantize_int8_static(out["fp32"], p, feeds, qf, attention=att)
            print(f"built {p} in {time.time() - t0:.1f}s", flush=True)
        out[tag] = p
    return out


def session(path: Path, cfg: str, threads: int | None, profile_dir: Path | None = None):
    import onnxruntime as ort

    from theseus_deploy.runtime import ort_session_options

    opts = ort_session_options(cfg, threads)
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_dir / path.stem)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", type=int, action="append", required=True)
    ap.add_argument("--work", default="runs/int8-probe")
    ap.add_argument("--variants", default="dyn,qdq,qop,qdq-attfp32")
    ap.add_argument("--configs", default="default,latency")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from theseus_deploy.bench.env import environment

    env = environment(a.threads)
    print(f"cpu: {env['cpu']} flags: {' '.join(env['cpu_flags'])} onnxruntime {env['versions'].get('onnxruntime')}")
    work = Path(a.work)
    variants, configs = a.variants.split(","), a.configs.split(",")
    paths = {L: build(a.model, L, work, a.calib, a.seq, variants) for L in a.layers}
    if a.profile:
        prof = work / "profiles"
        prof.mkdir(exist_ok=True)
        for L in a.layers:
            for v in variants:
                s = session(paths[L][v], configs[-1], a.threads, prof)
                feeds = _feeds(s, 1, a.seq)
                for _ in range(20):
                    s.run(["logits"], feeds)
                f = s.end_profiling()
                print(f"--- L{L} {v}: top ops by time ({f})")
                for op, us in _top_ops(f)[:8]:
                    print(f"   {op:<32} {us / 20 / 1000:7.2f} ms/call")
        return
    cells = {(L, v, c): session(paths[L][v], c, a.threads) for L in a.layers for v in variants for c in configs}
    results = {}
    for b in [int(x) for x in a.batch_sizes.split(",")]:
        feeds = {k: _feeds(s, b, a.seq) for k, s in cells.items()}
        for k, s in cells.items():
            for _ in range(3):
                s.run(["logits"], feeds[k])
        rounds = {k: [] for k in cells}
        keys = list(cells)
        for r in range(a.rounds):
            for k in (keys if r % 2 == 0 else keys[::-1]):
                ts = []
                for _ in range(a.calls):
                    t0 = time.perf_counter()
                    cells[k].run(["logits"], feeds[k])
                    ts.append(time.perf_counter() - t0)
                rounds[k].append(statistics.median(ts))
        print(f"\nb{b} s{a.seq}: p50 of round medians (ms) [min-max over {a.rounds} rounds]")
        for k, v in rounds.items():
            print(f"  L{k[0]:<3} {k[1]:<12} {k[2]:<8} {1e3 * statistics.median(v):7.2f} [{1e3 * min(v):.2f}-{1e3 * max(v):.2f}]")
        base = (a.layers[0], variants[0], configs[0])
        print(f"  paired ratios: vs L{base[0]} {base[1]} {base[2]} (>1 faster), and depth ratio in the same cell")
        for k, v in rounds.items():
            r1 = [x / y for x, y in zip(rounds[base], v)]
            line = f"  L{k[0]:<3} {k[1]:<12} {k[2]:<8} vs base {statistics.median(r1):5.2f}x [{min(r1):.2f}-{max(r1):.2f}]"
            if k[0] != a.layers[0]:
                r2 = [x / y for x, y in zip(rounds[(a.layers[0], k[1], k[2])], v)]
                line += f"  depth {statistics.median(r2):5.2f}x [{min(r2):.2f}-{max(r2):.2f}]"
            print(line)
        results[b] = {f"L{k[0]}|{k[1]}|{k[2]}": v for k, v in rounds.items()}
    if a.json:
        Path(a.json).write_text(json.dumps({"environment": env, "rounds_s": results}, indent=1))


def _feeds(sess, b, s):
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(b, s), dtype=np.int64)
    f = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {i.name: f[i.name] for i in sess.get_inputs()}


def _top_ops(path):
    ev = json.loads(Path(path).read_text())
    tot = {}
    for e in ev:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            tot[op] = tot.get(op, 0) + e.get("dur", 0)
    return sorted(tot.items(), key=lambda x: -x[1])


if __name__ == "__main__":
    main()
