"""What the numbers were measured on."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess

from theseus_deploy.cpu import cpu_flags, cpu_model


def environment(threads: int | None = None) -> dict:
    env = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
           "logical_cores": os.cpu_count(), "threads": threads,
           "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if os.environ.get(k)}}
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
            try:
                env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                               capture_output=True, text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                pass
    except ImportError:
        pass
    env["cpu_flags"] = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                        if f in _cpu_flags()]
    versions = {}
    for pkg in ("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    env["versions"] = versions
    return env


def _cpu_model() -> str:
    return cpu_model()


def _cpu_flags() -> set:
    return cpu_flags()
