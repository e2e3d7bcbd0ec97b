"""The serving dependencies are optional (setup.py's `serve` extra, nvidia-pytriton installed by
`make install`): a command that needs one that is missing says so in one line, with the install
command, before it does any work (measured before this module: `serve` printed a 30-line
ModuleNotFoundError traceback, exit 1, `export --format triton` likewise)."""
from __future__ import annotations

import importlib

from theseus_deploy.errors import UsageError

# top-level module -> what pip installs it from
PACKAGES = {"pytriton": "nvidia-pytriton", "tritonclient": "tritonclient[grpc,http]", "google": "protobuf",
            "zmq": "pyzmq", "aiohttp": "aiohttp", "sh": "sh", "typing_inspect": "typing_inspect", "wrapt": "wrapt",
            "typer": "typer", "grpc": "grpcio", "geventhttpclient": "geventhttpclient", "psutil": "psutil",
            "yarl": "yarl"}  # yarl: aiohttp's URLs (the serve gateway builds Triton's with it)
INSTALL = ("run `make install`, or `pip install -e '.[serve]'` and `pip install --no-deps nvidia-pytriton==0.7.0` "
           "(see docs/serve.md)")


def require(what: str, *modules: str) -> None:
    """Import `modules` (with everything they import); a UsageError naming the missing package if one fails."""
    for module in modules:
        try:
            importlib.import_module(module)
        except (ImportError, RuntimeError) as e:
            # tritonclient.http / .grpc turn a missing module of theirs into a RuntimeError ("The installation
            # does not include http support ..."): the ImportError is its cause.
            cause = e
            while cause is not None and not isinstance(cause, ImportError):
                cause = cause.__cause__
            if cause is None:
                raise
            missing = (getattr(cause, "name", None) or module).split(".")[0]
            raise UsageError(f"{what} needs {PACKAGES.get(missing, missing)}, which cannot be imported ({cause}): "
                             f"{INSTALL}") from None
