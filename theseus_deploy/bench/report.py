"""results.json, results.csv, report.md and PNG plots from one bench run."""
from __future__ import annotations

import csv
import io
from pathlib import Path


def _fmt_ms(s: float) -> str:
    return f"{1000 * s:.2f}"


def write_csv(cells: list[dict], path: Path):
    buf = io.StringIO()
    cols = ["model", "role", "layers", "backend", "device", "batch_size", "seq_len", "mean_ms", "p50_ms", "p90_ms",
            "p99_ms", "std_ms", "n", "throughput_seq_s", "throughput_tok_s", "gflops", "achieved_gflops_s", "peak_mem_mb"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for c in cells:
        lat = c["latency_s"]
        w.writerow({**{k: c.get(k) for k in cols if k in c}, "mean_ms": 1000 * lat["mean"], "p50_ms": 1000 * lat["p50"],
                    "p90_ms": 1000 * lat["p90"], "p99_ms": 1000 * lat["p99"], "std_ms": 1000 * lat["std"], "n": lat["n"]})
    path.write_text(buf.getvalue())


def markdown(results: dict) -> str:
    cfg, cells, sp = results["config"], results["cells"], results["speedups"]
    env = results["environment"]
    out = [f"# Benchmark: {', '.join(m['tag'] for m in results['models'])}", "",
           f"Device {cfg['device']} ({env.get('gpu') or env.get('cpu')}), threads {env.get('torch_threads')}, "
           f"{cfg['rounds']} interleaved rounds, >= {cfg['iterations']} iterations and {cfg['min_seconds']} s per cell "
           f"after {cfg['warmup']} warm-up calls. Speedups are medians of paired per-round ratios [min-max].", "",
           "## Latency per backend (ms, p50 / p90 / p99)", "",
           "| model | layers | backend | batch | seq | p50 | p90 | p99 | seq/s |", "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lat = c["latency_s"]
        out.append(f"| {c['model']} | {c['layers']} | {c['backend']} | {c['batch_size']} | {c['seq_len']} | "
                   f"{_fmt_ms(lat['p50'])} | {_fmt_ms(lat['p90'])} | {_fmt_ms(lat['p99'])} | {c['throughput_seq_s']:.1f} |")
    rows = [r for r in sp if "vs_predecessor_same_backend" in r]
    if rows:
        out += ["", "## Speedup vs predecessor, same backend (depth)", "",
                "| model | backend | batch | seq | speedup | ideal (FLOPs) | efficiency |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            v = r["vs_predecessor_same_backend"]
            out.append(f"| {r['model']} | {r['backend']} | {r['batch_size']} | {r['seq_len']} | {v['median']:.2f}x "
                       f"[{v['min']:.2f}-{v['max']:.2f}] | {r['ideal_speedup']:.2f}x | {r['efficiency']:.0%} |")
    rows = [r for r in sp if "vs_predecessor_torch_fp32" in r]
    if rows:
        out += ["", "## Speedup vs predecessor in PyTorch fp32 (deploy)", "",
                "| model | backend | batch | seq | speedup |", "|---|---|---|---|---|"]
        for r in rows:
            v = r["vs_predecessor_torch_fp32"]
            out.append(f"| {r['model']} | {r['backend']} | {r['batch_size']} | {r['seq_len']} | {v['median']:.2f}x "
                       f"[{v['min']:.2f}-{v['max']:.2f}] |")
    if results.get("traffic"):
        t = results["traffic"]
        base = next((x for x in t if x["role"] == "predecessor" and x["backend"] == "torch" and x["padding"].startswith("fixed")), None)
        out += ["", f"## Real traffic: {results['config'].get('task')} dev ({t[0]['num_sentences']} sentences, batch {t[0]['batch_size']})", "",
                "| model | backend | padding | sentences/s | vs predecessor torch fixed |", "|---|---|---|---|---|"]
        for x in t:
            rel = f"{x['sentences_s'] / base['sentences_s']:.2f}x" if base else "-"
            out.append(f"| {x['model']} | {x['backend']} | {x['padding']} | {x['sentences_s']:.1f} | {rel} |")
    if results.get("gate"):
        g = results["gate"]
        out += ["", f"## Gate vs {g['baseline']} (tolerance {g['tolerance']:.0%}): "
                + ("PASS" if not g["failures"] else "FAIL"), ""] + [f"- {f}" for f in g["failures"]]
    return "\n".join(out) + "\n"


def plots(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cells = results["cells"]
    batches = sorted({c["batch_size"] for c in cells})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for key in sorted({(c["model"], c["backend"]) for c in cells}):
            pts = sorted((c["seq_len"], 1000 * c["latency_s"]["p50"]) for c in cells
                         if c["batch_size"] == b and (c["model"], c["backend"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} / {key[1]}")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "latency_vs_seq.png", dpi=110)
    plt.close(fig)
    written.append("latency_vs_seq.png")

    rows = [r for r in results["speedups"] if "vs_predecessor_same_backend" in r]
    for model, backend in sorted({(r["model"], r["backend"]) for r in rows}):
        sel = [r for r in rows if r["model"] == model and r["backend"] == backend]
        bs = sorted({r["batch_size"] for r in sel})
        ss = sorted({r["seq_len"] for r in sel})
        grid = [[next((r["vs_predecessor_same_backend"]["median"] for r in sel
                       if r["batch_size"] == b and r["seq_len"] == s), float("nan")) for s in ss] for b in bs]
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(ss), 1.2 + 0.9 * len(bs)))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(ss)), [str(s) for s in ss])
        ax.set_yticks(range(len(bs)), [str(b) for b in bs])
        ax.set_xlabel("sequence length")
        ax.set_ylabel("batch size")
        for i in range(len(bs)):
            for j in range(len(ss)):
                ax.text(j, i, f"{grid[i][j]:.2f}x", ha="center", va="center", color="w", fontsize=9)
        ax.set_title(f"{model} vs predecessor ({backend})", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        name = f"speedup_{model}_{backend}.png".replace("/", "_")
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
