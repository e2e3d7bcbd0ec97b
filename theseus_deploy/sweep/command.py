"""`theseus-deploy sweep`: options from `SweepConfig`; the work is in theseus_deploy.sweep.api.

Exit codes: 0 a point was chosen (DIR/best/), 2 bad input, 3 no point meets both the latency
budget and the drop limit (the outputs are still written; the message names the closest point).
"""
import click

from theseus_deploy import config as C
from theseus_deploy.cli import options_from
from theseus_deploy.registry import BACKENDS

NOTHING_MEETS = 3


@click.command(name="sweep", epilog="Backends: " + "; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))
@options_from(C.SweepConfig, required=("model", "task", "output"))
def sweep(**kwargs):
    """Compress to several depths, export to several backends, time each point at the deployment shape (or
    on real traffic), and pick the most accurate one within a latency budget and a drop limit."""
    from theseus_deploy.sweep.api import run_sweep

    record = run_sweep(C.SweepConfig.of(**kwargs))
    out = kwargs["output"]
    click.echo(click.open_file(f"{out}/report.md").read())
    dec = record["decision"]
    if not dec.get("choice"):
        click.echo(f"error: {dec['message']}", err=True)
        raise SystemExit(NOTHING_MEETS)
    click.echo(f"chosen: {dec['choice']} -> {out}/best")
