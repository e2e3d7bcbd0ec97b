"""`theseus-deploy serve MODEL` and `theseus-deploy loadtest URL...`: options from ServeConfig /
LoadtestConfig; the work is in theseus_deploy.serve.server and theseus_deploy.serve.loadtest."""
import click

from theseus_deploy import config as C
from theseus_deploy.cli import options_from


def _positional(name: str, nargs: int = 1):
    """options_from makes an option of every field; this one field is a positional argument instead."""
    def decorate(fn):
        fn.__click_params__ = [p for p in getattr(fn, "__click_params__", []) if p.name != name]
        return click.argument(name, nargs=nargs, required=True)(fn)

    return decorate


@click.command(name="serve")
@_positional("model")
@options_from(C.ServeConfig)
def serve(**kwargs):
    """Serve a text classifier on a real Triton server (PyTriton): KServe v2 HTTP + gRPC, dynamic batching.

    Send text, get label and score: POST /v2/models/text_classifier/infer with input `text` (BYTES).
    Stops cleanly on Ctrl+C or SIGTERM.
    """
    from theseus_deploy.serve.server import run_serve

    run_serve(C.ServeConfig(**kwargs))


@click.command(name="loadtest")
@_positional("urls", nargs=-1)
@options_from(C.LoadtestConfig, required=("output",))
def loadtest(**kwargs):
    """Load served models with real dev-set texts at several concurrencies (loopback only, bounded)."""
    from theseus_deploy.serve.loadtest import run_loadtest

    results = run_loadtest(C.LoadtestConfig(**kwargs))
    click.echo(open(f"{results['output']}/report.md").read())
