"""`theseus-deploy bench`: click only at import time; the work is in bench.api."""
import click

from theseus_deploy.registry import BACKENDS


@click.command(name="bench")
@click.option("--model", "models", multiple=True, required=True,
              help="Model folder or hub id; repeat: the first is the predecessor, the others are compared with it. "
                   "A config-only folder (e.g. ../shared/models/bert-base-uncased) gets random weights.")
@click.option("--layers", multiple=True, type=int, help="Random-init depth for the models (one value, or one per --model).")
@click.option("--backend", "backends", multiple=True,
              type=click.Choice(list(BACKENDS)),
              help="Backend(s) to time; repeat for several. Default: torch. "
                   + "; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--seq-lens", default="32,128,384", show_default=True, help="Comma-separated sequence lengths.")
@click.option("--warmup", default=3, show_default=True, type=int, help="Warm-up calls per runner and shape.")
@click.option("--iterations", default=10, show_default=True, type=int, help="At least this many timed calls per cell.")
@click.option("--min-seconds", default=0.5, show_default=True, type=float, help="And at least this many seconds per cell.")
@click.option("--rounds", default=5, show_default=True, type=int, help="Interleaved rounds per shape (paired ratios).")
@click.option("--threads", default=None, type=int, help="CPU threads (torch and ONNX Runtime); recorded.")
@click.option("--output", required=True, help="Folder for results.json, results.csv, report.md and plots.")
@click.option("--check", default=None, help="Baseline JSON: fail (exit 1) if a speedup ratio regressed beyond --tolerance.")
@click.option("--tolerance", default=0.1, show_default=True, type=float, help="Allowed relative drop of a ratio.")
@click.option("--update-baseline", default=None, help="Write this run's ratios as a baseline JSON here.")
@click.option("--task", default=None, help="Real traffic: time the whole dev set of this task.")
@click.option("--data-dir", default=None, help="Local glue_data folder for --task.")
@click.option("--train-file", default=None, help="--task custom: training file (defines the label set).")
@click.option("--validation-file", default=None, help="--task custom: the file whose texts are timed.")
@click.option("--text-columns", default=None, help="--task custom: text column(s), a[,b].")
@click.option("--label-column", default=None, help="--task custom: label column.")
@click.option("--max-eval-samples", default=None, type=int, help="Real traffic: only the first N dev examples.")
@click.option("--traffic-batch-size", default=32, show_default=True, type=int)
@click.option("--traffic-max-length", default=128, show_default=True, type=int, help="Fixed-padding length (and truncation).")
@click.option("--traffic-rounds", default=1, show_default=True, type=int)
@click.option("--overwrite/--no-overwrite", default=False)
def bench(models, output, check, **kwargs):
    """Latency / throughput sweep over batch x sequence, every backend, predecessor vs successor."""
    from theseus_deploy.bench.api import run_bench

    results = run_bench(models, output, check=check, **kwargs)
    click.echo((click.open_file(f"{output}/report.md").read()))
    gate = results.get("gate")
    if gate and gate["failures"]:
        for f in gate["failures"]:
            click.echo(f"regressed: {f}", err=True)
        raise SystemExit(1)
