"""`theseus-deploy`: a thin map from command to library function.

Each command's options are generated from its config dataclass (theseus_deploy/config.py),
and heavy libraries (torch, transformers, onnxruntime) are imported only inside the command
that needs them, so `theseus-deploy --help` answers at once.
"""
from __future__ import annotations

import dataclasses
import errno
import importlib
import os
import sys
import typing
from pathlib import Path

import click

from . import __version__
from . import config as C
from .errors import UsageError
from .io import DATA_DIR_ENV


_DISK_FULL = "No space left on device"


def workspace_data_dir() -> str | None:
    """The README's last default for --data-dir: `../shared/data/glue` beside the current folder (or
    beside the clone) when it exists. A convenience of the command line, not of the library
    (`data.resolve_data_dir` takes --data-dir or $THESEUS_DATA_DIR only): the CLI sets it as
    $THESEUS_DATA_DIR when that is unset, so the processes a command starts see the same folder."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        cand = base.parent / "shared" / "data" / "glue"
        if cand.is_dir():
            return str(cand)
    return None


class CliError(click.ClickException):
    """What a UsageError becomes: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None):
        _close_progress_bars()
        click.echo(f"error: {self.message}", err=True)


def _close_progress_bars() -> None:
    """End every open tqdm bar first: a bar leaves its line open (`\r` redraws, no newline), and the
    error line would be glued to it (`train:  50%|...|\rerror: ...`)."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar of a finished thread: nothing to end
            pass


class LazyGroup(click.Group):
    """A group whose commands live in other packages and are imported only when used."""

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx, name):
        if name in self.lazy_commands:
            module, attr = self.lazy_commands[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's own usage errors (a bad choice, a missing option) also become one `error:` line, exit 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            _close_progress_bars()
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            raise CliError(str(e)) from None
        except Exception as e:
            # A full disk is the user's to fix, not a bug: one line (outputs are atomic, nothing half-written).
            full = _disk_full(e)
            if full is not None:
                where = f" writing {full.filename}" if getattr(full, "filename", None) else ""
                raise CliError(f"no space left on device{where}; nothing was written") from None
            raise


def _disk_full(e: BaseException):
    """The exception of `e`'s chain that says the disk is full, or None. torch.save and safetensors
    report it in their own types: safetensors in the message, torch's writer as `RuntimeError ...
    unexpected pos` whose context (or cause) is the OSError(ENOSPC)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or _DISK_FULL in str(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def _click_type(tp, choices):
    if choices:
        return click.Choice(choices, case_sensitive=False)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return {int: int, float: float, str: str}.get(base, str)


def options_from(cls, required: tuple[str, ...] = ()):
    """Decorate a click command with one option per dataclass field: name, type, choices, help and
    repeatability come from the field and its metadata (theseus_deploy/config.py), for every command.
    Nested groups (`config.group`) give flat options with their prefix (`--int8-reduce-range`); the
    command builds its config from them with `Config.of(**kwargs)`."""

    def decorate(fn):
        for name, f, tp, _ in reversed(C.flat_fields(cls)):
            meta = f.metadata
            flag = meta.get("flag") or "--" + name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if tp is bool or tp == (bool | None):  # bool | None: a tri-state flag pair, None when neither is given
                decls = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
                fn = click.option(decls, name, default=default, show_default=default is not None,
                                  help=meta.get("help"))(fn)
            elif meta.get("multiple"):
                elem = _click_type((typing.get_args(tp) or (str,))[0], meta.get("choices"))
                fn = click.option(flag, name, type=elem, multiple=True, required=name in required,
                                  help=meta.get("help"))(fn)
            else:
                fn = click.option(flag, name, type=_click_type(tp, meta.get("choices")), default=default,
                                  required=name in required, show_default=default is not None,
                                  help=meta.get("help"))(fn)
        return fn

    return decorate


@click.group(cls=LazyGroup, lazy_commands={"export": "theseus_deploy.export.command:export",
                                           "bench": "theseus_deploy.bench.command:bench",
                                           "sweep": "theseus_deploy.sweep.command:sweep",
                                           "serve": "theseus_deploy.serve.command:serve",
                                           "loadtest": "theseus_deploy.serve.command:loadtest"},
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="theseus-deploy")
def cli():
    """Compress a fine-tuned BERT-family classifier with BERT-of-Theseus, export it, and benchmark it."""
    if not os.environ.get(DATA_DIR_ENV):
        found = workspace_data_dir()
        if found:
            os.environ[DATA_DIR_ENV] = found


@cli.command()
@options_from(C.FinetuneConfig, required=("model", "task", "output"))
def finetune(**kwargs):
    """Fine-tune a model on a task; the result is the predecessor for `compress`."""
    cfg = C.FinetuneConfig(**kwargs)  # flags checked before torch is imported (seconds)
    from .recipes.finetune import run_finetune

    run_finetune(cfg)


@cli.command()
@options_from(C.CompressConfig, required=("model", "task", "output"))
def compress(**kwargs):
    """Compress a fine-tuned predecessor into a shallower successor (BERT-of-Theseus)."""
    cfg = C.CompressConfig(**kwargs)  # flags checked before torch is imported (seconds)
    from .recipes.compress import run_compress

    run_compress(cfg)


@cli.command()
@options_from(C.EvaluateConfig, required=("model", "task"))
def evaluate(**kwargs):
    """Score a model folder on a task's dev split."""
    cfg = C.EvaluateConfig(**kwargs)  # flags checked before torch is imported (seconds)
    from .recipes.evaluate import run_evaluate

    run_evaluate(cfg)


def main(argv=None):
    cli.main(args=argv, prog_name="theseus-deploy")


if __name__ == "__main__":
    sys.exit(main())
