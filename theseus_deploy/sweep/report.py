"""sweep.json, sweep.csv, report.md, pareto.png and best/ from the finished stages of a sweep.

Everything here reads what the stages wrote (scores, exports, timings); nothing is trained or
timed, so re-deciding with another budget or percentile takes seconds.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np

from theseus_deploy import config as C
from theseus_deploy.io import atomic_output_dir, atomic_write_text, write_json
from theseus_deploy.loyalty import loyalty, loyalty_value

from .pareto import fmt_latency, marks, nothing_message, own_drop_rejection


def _pred_score(info, pred_layers) -> float:
    return info[(pred_layers, "torch")]["metrics"]["score"]


def point_loyalty(logits, reference) -> dict | None:
    """Loyalty of a point's dev logits to the predecessor's (None when a stage file holds no logits:
    written before loyalty was recorded)."""
    if logits is None or reference is None:
        return None
    a, b = np.asarray(logits, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return loyalty(a, b, regression=b.shape[-1] == 1)


def build_record(cfg, mode, budget, depths, backends, pred_layers, info, latency, stages, seconds) -> dict:
    ref_score = _pred_score(info, pred_layers)
    ref_logits = info[(pred_layers, "torch")].get("dev_logits")
    timed = latency["points"]
    points = []
    for d in depths:
        own = info[(d, "torch")]["metrics"]["score"]
        for bk in backends:
            i = info[(d, bk)]
            rec = {"layers": d, "backend": bk, "role": "predecessor" if d == pred_layers else "successor",
                   "run": i.get("run"), "export": i.get("export")}
            if i.get("rejected"):
                rec.update(rejected=i["rejected"], candidate=False)
                points.append(rec)
                continue
            s = i["metrics"]["score"]
            rec.update(score=s, metrics=i["metrics"], drop=ref_score - s, drop_vs_own_torch=own - s,
                       loyalty=point_loyalty(i.get("dev_logits"), ref_logits))
            why = own_drop_rejection(own, s, cfg.max_task_drop) if bk != "torch" else None
            if why:
                rec["rejected"] = why
            t = timed[f"L{d}|{bk}"]
            rec["latency_s"] = t["latency"]
            for k in ("vs_predecessor_torch_fp32", "vs_predecessor_same_backend"):
                if k in t:
                    rec[k] = t[k]
            rec["candidate"] = "rejected" not in rec
            points.append(rec)
    cfg_dict = C.to_dict(cfg)
    return {"config": cfg_dict, "mode": mode, "environment": latency["environment"],
            "requests_per_round": timed[f"L{pred_layers}|torch"].get("num_requests_per_round"),
            "predecessor": {"model": cfg.model, "layers": pred_layers, "score": ref_score,
                            "metrics": info[(pred_layers, "torch")]["metrics"],
                            "latency_s": timed[f"L{pred_layers}|torch"]["latency"]},
            "points": points, "stages": stages, "seconds": round(seconds, 1),
            "decision": {"budget_s": budget, "percentile": cfg.percentile, "max_task_drop": cfg.max_task_drop,
                         "min_loyalty": cfg.min_loyalty}}


def _loyalty_number(rec) -> float | None:
    return loyalty_value(rec["loyalty"]) if rec.get("loyalty") else None


def _loyalty_cell(rec) -> str:
    v = _loyalty_number(rec)
    return "-" if v is None else f"{v:.4f}"


def _ms(x) -> str:
    return f"{1000 * x:.2f}"


def _speed(rec, key) -> str:
    v = rec.get(key)
    return f"{v['median']:.2f}x" if v else "-"


def write_csv(points, path: Path):
    cols = ["layers", "backend", "role", "score", "drop", "loyalty", "p50_ms", "p90_ms", "p99_ms", "speedup_vs_pred_fp32",
            "speedup_vs_pred_same_backend", "on_frontier", "meets_limits", "chosen", "rejected"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in points:
        lat = r.get("latency_s") or {}
        w.writerow({"layers": r["layers"], "backend": r["backend"], "role": r["role"], "score": r.get("score"),
                    "drop": r.get("drop"), "loyalty": _loyalty_number(r),
                    **{f"{q}_ms": 1000 * lat[q] if q in lat else None for q in ("p50", "p90", "p99")},
                    "speedup_vs_pred_fp32": (r.get("vs_predecessor_torch_fp32") or {}).get("median"),
                    "speedup_vs_pred_same_backend": (r.get("vs_predecessor_same_backend") or {}).get("median"),
                    "on_frontier": r.get("on_frontier", False), "meets_limits": r.get("meets", False),
                    "chosen": r.get("chosen", False), "rejected": r.get("rejected", "")})
    atomic_write_text(path, buf.getvalue())


def markdown(record: dict) -> str:
    cfg, mode, env, pred = record["config"], record["mode"], record["environment"], record["predecessor"]
    dec = record["decision"]
    q = dec["percentile"]
    metric = ", ".join(f"{k} {v:.4f}" for k, v in pred["metrics"].items() if k != "score")
    if mode["kind"] == "shape":
        how = f"requests of batch {mode['batch_size']} x sequence {mode['seq_len']} (random token ids)"
    else:
        how = (f"real traffic: single {cfg['task']} dev sentences, each padded to its own length "
               f"(up to {mode['max_length']} tokens), {record.get('requests_per_round')} requests per round")
    flags = ", ".join(env.get("cpu_flags") or []) or "none of avx512f/avx512_vnni/avx512_bf16/amx"
    out = [f"# Sweep: {Path(pred['model']).name} on {cfg['task']}", "",
           f"Predecessor: {pred['model']} ({pred['layers']} layers), dev score {pred['score']:.4f} ({metric}).",
           f"Latency: {how}; device {cfg['device']} ({env.get('gpu') or env.get('cpu')}; CPU flags: {flags}), "
           f"threads {env.get('torch_threads')}, {cfg['rounds']} interleaved rounds; speedups are medians of per-round "
           "paired ratios against the predecessor.",
           "Per-depth compress budget: " + (f"{cfg['max_steps']} steps" if cfg.get("max_steps") else f"{cfg['epochs']:g} epoch(s)")
           + f" at sequence length {cfg['max_seq_length']}, batch {cfg['batch_size']}, seed {cfg['seed']}.",
           f"Limits: {q} <= " + (fmt_latency(dec["budget_s"]) if dec["budget_s"] else "(no budget)")
           + f", dev score at most {dec['max_task_drop']:g} below the predecessor's"
           + (f", loyalty to the predecessor at least {dec['min_loyalty']:g}" if dec.get("min_loyalty") else "")
           + ". Loyalty: the share of dev rows where a point predicts the predecessor's label (regression: the "
           "Pearson correlation of the two predictions).", "", "## Choice", ""]
    if dec.get("choice"):
        c = next(r for r in record["points"] if r.get("chosen"))
        out.append(f"**{dec['choice']}**: dev {c['score']:.4f} (drop {c['drop']:+.4f}, loyalty {_loyalty_cell(c)}), {q} "
                   f"{fmt_latency(c['latency_s'][q])}, {_speed(c, 'vs_predecessor_torch_fp32')} vs the predecessor in "
                   f"PyTorch fp32. Copied to `best/`: `TextClassifier.load(\"best\", backend=\"{c['backend']}\")`.")
    else:
        out.append(f"Nothing chosen: {dec.get('message', 'no candidate point')}.")
    out += ["", f"## Points ({q} decides; * frontier, > chosen)", "",
            "| depth | backend | dev score | drop | loyalty | p50 ms | p99 ms | vs pred fp32 | vs pred same backend | frontier "
            "| within limits |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["points"]:
        if not r.get("candidate"):
            continue
        mark = ">" if r.get("chosen") else ""
        lat = r["latency_s"]
        out.append(f"| {mark}{r['layers']} | {r['backend']} | {r['score']:.4f} | {r['drop']:+.4f} | {_loyalty_cell(r)} | "
                   f"{_ms(lat['p50'])} | "
                   f"{_ms(lat['p99'])} | {_speed(r, 'vs_predecessor_torch_fp32')} | "
                   f"{_speed(r, 'vs_predecessor_same_backend')} | {'*' if r.get('on_frontier') else ''} | "
                   f"{'yes' if r.get('meets') else 'no'} |")
    rejected = [r for r in record["points"] if r.get("rejected")]
    if rejected:
        out += ["", "## Rejected by the export checks", ""] + [f"- L{r['layers']} {r['backend']}: {r['rejected']}" for r in rejected]
    front = [r for r in record["points"] if r.get("on_frontier")]
    out += ["", "## Frontier (fastest first)", ""] + [
        f"- L{r['layers']} {r['backend']}: {q} {fmt_latency(r['latency_s'][q])}, dev {r['score']:.4f}"
        for r in sorted(front, key=lambda r: r["latency_s"][q])]
    return "\n".join(out) + "\n"


def plot(record: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec, q, pred = record["decision"], record["decision"]["percentile"], record["predecessor"]
    pts = [r for r in record["points"] if r.get("candidate")]
    backends = list(dict.fromkeys(r["backend"] for r in pts))
    markers = "osD^vP<>X"
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for j, bk in enumerate(backends):
        sel = [r for r in pts if r["backend"] == bk]
        ax.scatter([1000 * r["latency_s"][q] for r in sel], [r["score"] for r in sel], marker=markers[j % len(markers)],
                   s=45, label=bk, zorder=3)
        for r in sel:
            ax.annotate(f"L{r['layers']}", (1000 * r["latency_s"][q], r["score"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    front = sorted((r for r in pts if r.get("on_frontier")), key=lambda r: r["latency_s"][q])
    if front:
        xs, ys = [1000 * r["latency_s"][q] for r in front], [r["score"] for r in front]
        ax.step(xs, ys, where="post", color="k", lw=1.2, alpha=0.7, label="Pareto frontier", zorder=2)
    preds = [r for r in pts if r["role"] == "predecessor"]
    ax.scatter([1000 * r["latency_s"][q] for r in preds], [r["score"] for r in preds], marker="*", s=260,
               facecolors="none", edgecolors="crimson", lw=1.3, label=f"predecessor (L{pred['layers']})", zorder=4)
    # The axes follow the points; a budget or drop limit far outside them is named, not drawn
    # (a 10 s budget would squash every point into one corner).
    xs_all, ys_all = [1000 * r["latency_s"][q] for r in pts], [r["score"] for r in pts]
    x_hi = 1.15 * max(xs_all)
    y_lo, y_hi = min(ys_all), max(ys_all)
    pad = max(0.01, 0.1 * (y_hi - y_lo))
    ylim = (y_lo - pad, y_hi + pad)
    if dec.get("budget_s"):
        b_ms, label = 1000 * dec["budget_s"], f"budget {fmt_latency(dec['budget_s'])}"
        if b_ms <= 2 * max(xs_all):
            ax.axvline(b_ms, color="tab:red", ls="--", lw=1, label=label)
            x_hi = max(x_hi, 1.05 * b_ms)
        else:
            ax.plot([], [], color="tab:red", ls="--", lw=1, label=label + " (right of the chart)")
    limit = pred["score"] - dec["max_task_drop"]
    label = f"drop limit {dec['max_task_drop']:g} (score {limit:.4f})"
    if limit >= ylim[0] - 3 * pad:
        ax.axhline(limit, color="tab:gray", ls=":", lw=1.2, label=label)
        ylim = (min(ylim[0], limit - pad / 2), ylim[1])
    else:
        ax.plot([], [], color="tab:gray", ls=":", lw=1.2, label=label + " (below the chart)")
    if max(xs_all) > 20 * min(xs_all):  # e.g. a tiny model whose ONNX call takes 1/50 of PyTorch's
        ax.set_xscale("log")
        ax.set_xlim(min(xs_all) / 1.5, x_hi)
    else:
        ax.set_xlim(0, x_hi)
    ax.set_ylim(*ylim)
    chosen = [r for r in pts if r.get("chosen")]
    if chosen:
        c = chosen[0]
        ax.scatter([1000 * c["latency_s"][q]], [c["score"]], s=420, facecolors="none", edgecolors="tab:green", lw=2,
                   label=f"chosen: L{c['layers']} {c['backend']}", zorder=5)
    mode = record["mode"]
    ax.set_xlabel(f"{q} latency (ms), " + (f"batch {mode['batch_size']} x seq {mode['seq_len']}"
                                             if mode["kind"] == "shape" else "real traffic, single requests"))
    ax.set_ylabel(f"dev score ({record['config']['task']})")
    ax.set_title(f"{Path(pred['model']).name}: accuracy vs latency ({record['environment'].get('cpu') or ''})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_best(out: Path, rec: dict, record: dict, model_dir):
    """DIR/best/: a deployable folder (artifact or model weights, config, tokenizer) with its manifest."""
    src = Path(rec["run"])
    with atomic_output_dir(out / "best", overwrite=True) as tmp:
        for p in src.iterdir():
            if p.is_file() and p.name not in ("train_log.jsonl",):
                shutil.copy2(p, tmp / p.name)
        manifest = json.loads((tmp / "manifest.json").read_text()) if (tmp / "manifest.json").is_file() else {
            "source_model": str(src.resolve()), "num_layers": rec["layers"], "artifacts": []}
        manifest.update(backend=rec["backend"], sweep={
            "layers": rec["layers"], "backend": rec["backend"], "dev": rec["metrics"], "drop": rec["drop"],
            "loyalty": rec.get("loyalty"),
            "latency_s": rec["latency_s"], "mode": record["mode"], "decision": record["decision"],
            "load": f"TextClassifier.load(<this folder>, backend=\"{rec['backend']}\")"})
        write_json(tmp / "manifest.json", manifest)


def write_outputs(out: Path, record: dict, pts, decision, cfg, info, model_dir):
    cands = [r for r in record["points"] if r.get("candidate")]
    if decision is not None:
        q = cfg.percentile
        for r, m in zip(cands, marks(pts, decision)):
            r.update(m)
        record["decision"]["frontier"] = [pts[j].name for j in decision.frontier]
        record["decision"]["choice"] = pts[decision.choice].name if decision.choice is not None else None
        if decision.choice is None:
            record["decision"]["closest"] = pts[decision.closest].name
            record["decision"]["message"] = nothing_message(pts, decision, q)
    else:
        record["decision"].update(choice=None, message="every point was rejected by the export checks")
    write_json(out / "sweep.json", record)
    write_json(out / "run_config.json", {**C.to_dict(cfg), "command": "sweep"})
    write_csv(record["points"], out / "sweep.csv")
    atomic_write_text(out / "report.md", markdown(record))
    if cands:
        plot(record, out / "pareto.png")
    if record["decision"].get("choice"):
        write_best(out, next(r for r in cands if r.get("chosen")), record, model_dir)
    elif (out / "best").is_dir():
        shutil.rmtree(out / "best")  # a previous decision's choice no longer holds
