"""Placeholder: the `export` command is being written."""
import click


@click.command(name="export")
def export():
    """(not yet available)"""
    raise click.ClickException("'export' is not implemented yet")
