"""results.json, results.csv, report.md and PNG plots from one bench run."""
from __future__ import annotations

import csv
import io
import json
import sys
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
           "## Models", "", "| model | role | layers | weights |", "|---|---|---|---|"]
    for m in results["models"]:
        if m.get("random_init"):
            what = "random weights (built by bench from the config)"
        elif m.get("export_folder"):
            what = "export folder: its own artifacts, as shipped"
        else:
            what = "the model folder's weights" + (" (ONNX/TensorRT artifacts exported by bench)"
                                                   if any(a["model"] == m["tag"] for a in results.get("artifacts") or []) else "")
        out.append(f"| {m['tag']} | {m['role']} | {m['config'].get('num_hidden_layers')} | {what} |")
    if results.get("artifacts"):
        out += ["", "## Artifacts timed", "", "| model | backend | file | sha256 | from |", "|---|---|---|---|---|"]
        out += [f"| {a['model']} | {a['backend']} | {a['file']} | {a['sha256'][:16]} | {a['source']} |"
                for a in results["artifacts"]]
    out += ["", "## Latency per backend (ms, p50 / p90 / p99)", "",
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
    if results.get("compiled"):
        out += ["", "## Compiled runners (torch-compile*)", "",
                "| runner | buckets (batch x seq) | compile s (sweep) | run without CUDA graph |", "|---|---|---|---|"]
        for key, c in results["compiled"].items():
            buckets = ", ".join(f"{b}x{s}" for b, s in c["buckets"])
            skipped = ", ".join(f"{b}x{s}" for b, s in c.get("cudagraph_skipped", [])) or "-"
            out.append(f"| {key.replace('|', ' / ')} | {buckets} | {c['compile_seconds']} | {skipped} |")
    if results.get("gate"):
        g = results["gate"]
        out += ["", f"## Gate vs {g['baseline']} (tolerance {g['tolerance']:.0%}): "
                + ("PASS" if not g["failures"] else "FAIL"), ""] + [f"- {f}" for f in g["failures"]]
        if g.get("unclear"):
            out += ["", "Below the threshold by the median, but not by the rounds (noise, not a regression; "
                    "re-run on a quiet machine to be sure):", ""] + [f"- {f}" for f in g["unclear"]]
    return "\n".join(out) + "\n"


# Targets drawn on the summary chart (the project's targets, recorded in docs/bench.md, never asserted):
# successor's best backend vs the predecessor in PyTorch fp32 eager, and depth speedup per backend.
TARGETS = {"cuda": {"deploy": (12.0, "b32 s128"), "depth": (1.95, "batch >= 8, s128")},
           "cpu": {"deploy": (6.0, "b1 s128"), "depth": (1.9, "best backend, b1 s128")}}
MODEL_STYLE = ({"hatch": "//", "alpha": 0.55}, {"hatch": None, "alpha": 0.95})  # predecessor, successor(s)


def _backends(cells) -> list:
    return list(dict.fromkeys(c["backend"] for c in cells))


def _models(cells) -> list:
    return list(dict.fromkeys(c["model"] for c in cells))


def _legend_outside(fig, handles, labels):
    """One legend for the whole figure, right of the panels: never over data (constrained layout
    makes room for it; the PNG is saved with a tight bounding box)."""
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)


def _latency_figure(plt, results):
    """One sequence length: grouped bars per batch size (backend groups, a bar per model);
    several: lines of p50 against sequence length (colour = backend, line style = model)."""
    cells = results["cells"]
    batches = sorted({c["batch_size"] for c in cells})
    seqs = sorted({c["seq_len"] for c in cells})
    backends, models = _backends(cells), _models(cells)
    colors = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
    p50 = {(c["model"], c["backend"], c["batch_size"], c["seq_len"]): 1000 * c["latency_s"]["p50"] for c in cells}
    width = max(4.5, 0.6 * len(backends) * len(models) + 1.5) if len(seqs) == 1 else 4.5
    fig, axes = plt.subplots(1, len(batches), figsize=(width * len(batches), 4.2), squeeze=False, layout="constrained")
    handles = {}
    for ax, b in zip(axes[0], batches):
        if len(seqs) == 1:
            s = seqs[0]
            w = 0.8 / len(models)
            for j, m in enumerate(models):
                style = MODEL_STYLE[min(j, 1)]
                xs = [i + (j - (len(models) - 1) / 2) * w for i in range(len(backends))]
                ys = [p50.get((m, be, b, s), float("nan")) for be in backends]
                bars = ax.bar(xs, ys, w, color=[colors[be] for be in backends], alpha=style["alpha"],
                              hatch=style["hatch"], edgecolor="black", linewidth=0.5)
                for x, y in zip(xs, ys):
                    if y == y:
                        ax.annotate(f"{y:.3g}", (x, y), ha="center", va="bottom", fontsize=7,
                                    xytext=(0, 1), textcoords="offset points")
                handles.setdefault(f"{m} (bars {'hatched' if style['hatch'] else 'solid'})", bars[0])
            ax.set_xticks(range(len(backends)), backends, rotation=20, ha="right", fontsize=8)
            ax.set_title(f"batch {b}, sequence {s}", fontsize=10)
            ax.margins(y=0.12)
        else:
            for be in backends:
                for j, m in enumerate(models):
                    pts = [(s, p50[(m, be, b, s)]) for s in seqs if (m, be, b, s) in p50]
                    (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[be],
                                      linestyle="-" if j == 0 else ("--" if j == 1 else ":"))
                    handles.setdefault(f"{m} / {be}", line)
            ax.set_xticks(seqs)
            ax.set_xlabel("sequence length")
            ax.set_yscale("log")
            ax.set_title(f"batch {b}", fontsize=10)
        ax.set_ylabel("p50 latency (ms)")
        ax.grid(alpha=0.3, axis="y")
    if len(seqs) == 1 and len(models) > 1:
        handles = {**{be: plt.Rectangle((0, 0), 1, 1, color=colors[be]) for be in backends}, **handles}
    fig.suptitle(f"p50 latency per backend ({results['config']['device']})", fontsize=11)
    _legend_outside(fig, list(handles.values()), list(handles))
    return fig


def _speedup_figure(plt, results, rows):
    """ONE figure, a panel per backend: the successor's speedup over the predecessor in the same
    backend; bars per batch size for one sequence length, a heatmap for several."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    bs = sorted({r["batch_size"] for r in rows})
    ss = sorted({r["seq_len"] for r in rows})
    pred = results["models"][0]["tag"]
    depth, depth_where = TARGETS.get(results["config"]["device"], {}).get("depth", (None, ""))
    fig, axes = plt.subplots(1, len(backends), figsize=(max(3.6, 1.2 + 0.9 * len(bs) * len(models)) * len(backends)
                                                        if len(ss) == 1 else (1.8 + 1.1 * len(ss)) * len(backends), 4.0),
                             squeeze=False, layout="constrained")
    im = None
    for ax, be in zip(axes[0], backends):
        sel = {(r["model"], r["batch_size"], r["seq_len"]): r for r in rows if r["backend"] == be}
        if len(ss) == 1:
            w = 0.8 / len(models)
            for j, m in enumerate(models):
                xs = [i + (j - (len(models) - 1) / 2) * w for i in range(len(bs))]
                vals = [sel.get((m, b, ss[0])) for b in bs]
                ys = [v["vs_predecessor_same_backend"]["median"] if v else float("nan") for v in vals]
                lo = [y - v["vs_predecessor_same_backend"]["min"] if v else 0 for y, v in zip(ys, vals)]
                hi = [v["vs_predecessor_same_backend"]["max"] - y if v else 0 for y, v in zip(ys, vals)]
                ax.bar(xs, ys, w, yerr=[lo, hi], capsize=3, color=plt.cm.tab10(j + 1), label=m)
                for x, y in zip(xs, ys):  # inside the bar, clear of the error bar's whiskers
                    if y == y:
                        ax.text(x, y / 2, f"{y:.2f}x", ha="center", va="center", fontsize=9, color="white",
                                fontweight="bold", bbox={"facecolor": "black", "alpha": 0.35, "linewidth": 0})
            ideal = [sel[(models[0], b, ss[0])]["ideal_speedup"] for b in bs if (models[0], b, ss[0]) in sel]
            if ideal:
                ax.axhline(max(ideal), color="gray", linestyle=":", linewidth=1, label=f"ideal from FLOPs {max(ideal):.2f}x")
            if depth:
                ax.axhline(depth, color="red", linestyle="--", linewidth=1, label=f"target {depth}x ({depth_where})")
            ax.set_xticks(range(len(bs)), [f"batch {b}" for b in bs], fontsize=8)
            ax.set_ylabel(f"speedup at sequence {ss[0]}")
            ax.set_ylim(0, max(2.4, ax.get_ylim()[1]))
        else:
            m = models[0]
            grid = [[sel[(m, b, s)]["vs_predecessor_same_backend"]["median"] if (m, b, s) in sel else float("nan")
                     for s in ss] for b in bs]
            im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=1.0, vmax=2.2)
            ax.set_xticks(range(len(ss)), [str(s) for s in ss])
            ax.set_yticks(range(len(bs)), [str(b) for b in bs])
            ax.set_xlabel("sequence length")
            ax.set_ylabel("batch size")
            for i in range(len(bs)):
                for j in range(len(ss)):
                    ax.text(j, i, f"{grid[i][j]:.2f}x", ha="center", va="center", color="w", fontsize=9)
        ax.set_title(be, fontsize=10)
    succ = ", ".join(models)
    fig.suptitle(f"Speedup of {succ} over {pred} in the same backend (median of paired rounds, min-max)",
                 fontsize=10, wrap=True)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="speedup (colour clipped to 1.0-2.2x)")
    else:
        _legend_outside(fig, *axes[0][0].get_legend_handles_labels())
    return fig


def _summary_figure(plt, results, rows):
    """Each backend's speedup over the predecessor in PyTorch fp32, predecessor and successor,
    a panel per batch size, at one sequence length (128 where swept), with the target drawn."""
    seqs = sorted({r["seq_len"] for r in rows})
    s = 128 if 128 in seqs else seqs[-1]
    rows = [r for r in rows if r["seq_len"] == s]
    backends = [b for b in _backends(results["cells"]) if any(r["backend"] == b for r in rows) or b == "torch"]
    bs = sorted({r["batch_size"] for r in rows})
    pred = results["models"][0]["tag"]
    models = [m["tag"] for m in results["models"]]
    device = results["config"]["device"]
    target, where = TARGETS.get(device, {}).get("deploy", (None, ""))
    fig, axes = plt.subplots(1, len(bs), figsize=(max(4.5, 0.75 * len(backends) * len(models) + 1.5) * len(bs) + 3, 4.4),
                             squeeze=False, layout="constrained")
    for ax, b in zip(axes[0], bs):
        sel = {(r["model"], r["backend"]): r for r in rows if r["batch_size"] == b}
        w = 0.8 / len(models)
        top = 1.0
        for j, m in enumerate(models):
            xs = [i + (j - (len(models) - 1) / 2) * w for i in range(len(backends))]
            ys = [1.0 if (m == pred and be == "torch") else
                  (sel[(m, be)]["vs_predecessor_torch_fp32"]["median"] if (m, be) in sel else float("nan"))
                  for be in backends]
            style = MODEL_STYLE[min(j, 1)]
            ax.bar(xs, ys, w, color=plt.cm.tab10(j + 1), alpha=style["alpha"], hatch=style["hatch"],
                   edgecolor="black", linewidth=0.5, label=m)
            for x, y in zip(xs, ys):
                if y == y:
                    top = max(top, y)
                    ax.annotate(f"{y:.1f}x", (x, y), ha="center", va="bottom", fontsize=7, xytext=(0, 1),
                                textcoords="offset points")
        if target:
            ax.axhline(target, color="red", linestyle="--", linewidth=1.2,
                       label=f"target: successor's best >= {target:g}x at {where} ({device})")
            top = max(top, target)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_ylim(0, top * 1.15)
        ax.set_xticks(range(len(backends)), backends, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"batch {b}, sequence {s}", fontsize=10)
        ax.set_ylabel(f"speedup over {pred} PyTorch fp32")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Each backend vs the predecessor in PyTorch fp32 eager ({device})", fontsize=11)
    _legend_outside(fig, *axes[0][0].get_legend_handles_labels())
    return fig


def plots(results: dict, folder: Path) -> list[str]:
    """latency.png (bars for one sequence length, lines for several), speedup.png (one figure, a
    panel per backend), speedup_summary.png (every backend vs the predecessor in PyTorch fp32,
    targets drawn). Regenerate from a results.json: python -m theseus_deploy.bench.report FILE DIR."""
    try:
        import matplotlib
    except ImportError:  # e.g. a bare GPU image: the numbers are all in results.json / report.md
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.savefig(Path(folder) / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    save(_latency_figure(plt, results), "latency.png")
    rows = [r for r in results["speedups"] if "vs_predecessor_same_backend" in r]
    if rows:
        save(_speedup_figure(plt, results, rows), "speedup.png")
    rows = [r for r in results["speedups"] if "vs_predecessor_torch_fp32" in r]
    if rows and any(c["backend"] == "torch" for c in results["cells"]):
        save(_summary_figure(plt, results, rows), "speedup_summary.png")
    return written


def main(argv=None) -> int:
    """python -m theseus_deploy.bench.report RESULTS.json OUT_DIR: report.md and plots again."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m theseus_deploy.bench.report RESULTS.json OUT_DIR", file=sys.stderr)
        return 2
    src, out = Path(args[0]), Path(args[1])
    if not src.is_file():
        print(f"error: {src} does not exist", file=sys.stderr)
        return 2
    results = json.loads(src.read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(results))
    for name in plots(results, out):
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
