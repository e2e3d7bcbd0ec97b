"""`theseus-deploy bench`: options from `BenchConfig`; the work is in theseus_deploy.bench.api."""
import click

from theseus_deploy import config as C
from theseus_deploy.cli import options_from
from theseus_deploy.registry import BACKENDS


@click.command(name="bench", epilog="Backends: " + "; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))
@options_from(C.BenchConfig, required=("models", "output"))
def bench(**kwargs):
    """Latency / throughput sweep over batch x sequence, every backend, predecessor vs successor."""
    from theseus_deploy.bench.api import run_bench

    cfg = C.BenchConfig.of(**kwargs)
    results = run_bench(cfg)
    click.echo((click.open_file(f"{cfg.output}/report.md").read()))
    gate = results.get("gate")
    for f in (gate or {}).get("unclear", []):
        click.echo(f"unclear (noise, not failed): {f}", err=True)
    if gate and gate["failures"]:
        for f in gate["failures"]:
            click.echo(f"regressed: {f}", err=True)
        raise SystemExit(1)
