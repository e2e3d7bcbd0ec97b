"""Placeholder: the `bench` command is being written."""
import click


@click.command(name="bench")
def bench():
    """(not yet available)"""
    raise click.ClickException("'bench' is not implemented yet")
