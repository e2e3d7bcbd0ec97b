"""`load_runner`: the runner of a backend over a model folder (PyTorch) or an export folder.

From an export folder the artifact is the one `manifest.json` lists for the backend's format,
resolved by theseus_deploy.artifact (inside the folder, sha256 checked); nothing else is loaded.
"""
from __future__ import annotations

from pathlib import Path

from theseus_deploy.artifact import ExportFolder, is_export_folder
from theseus_deploy.errors import UsageError
from theseus_deploy.hf import check_fine_tuned, load_classifier, load_config
from theseus_deploy.registry import BACKENDS

from .base import Runner


def torch_runner(model, backend: str, device: str = "cpu", threads: int | None = None,
                 seq_bucket: int = 32) -> Runner:
    """The runner of a PyTorch backend (eager or compiled) over a loaded model."""
    spec = BACKENDS[backend]
    return spec.runner_class().open(spec, model, device, threads, seq_bucket=seq_bucket)


def precheck(backend: str, device: str) -> None:
    """Refuse, before anything is built or loaded, a backend this machine cannot run on `device`
    (unknown backend, wrong device, no GPU, no C++ compiler, no execution provider, no TensorRT)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}': choose from {', '.join(BACKENDS)}")
    spec = BACKENDS[backend]
    spec.runner_class().precheck(spec, device)


def load_runner(model: str, backend: str, device: str = "cpu", threads: int | None = None,
                artifact: str | None = None, verify_hash: bool = True, seq_bucket: int = 32,
                session_config: str = "default") -> Runner:
    """A runner for `backend` over a model folder (torch*) or an exported artifact (onnx*, trt).

    From an export folder, the artifact is the file manifest.json lists, only inside that folder,
    and its sha256 must match the manifest's (`verify_hash=False` skips the check). `artifact`: an
    explicit file instead (the caller's own choice; no manifest is read).
    `seq_bucket`: torch-compile* pad sequences to a multiple of it (batches to a power of two).
    `session_config`: ONNX Runtime session options (`ort_session_options`: default or latency)."""
    precheck(backend, device)  # say it before loading the weights
    spec = BACKENDS[backend]
    cls = spec.runner_class()
    if spec.format is None:  # (TextClassifier.load too: a bare encoder would classify with a new random head)
        check_fine_tuned(model, load_config(model), "model", "a runner classifies with a model fine-tuned on the "
                         "task (theseus-deploy finetune gives one)")
        return cls.open(spec, load_classifier(model), device, threads, seq_bucket=seq_bucket)
    if artifact:
        path = Path(artifact)
        if not path.is_file():
            raise UsageError(f"no {backend} artifact for {model}: {artifact} does not exist")
    elif is_export_folder(model):
        path = ExportFolder.read(model).resolve(spec.format, verify_hash)
    else:
        raise UsageError(f"no {backend} artifact for {model} (not an export folder: no manifest.json): "
                         f"run `theseus-deploy export --format {spec.format}` first")
    vocab = getattr(load_config(model), "vocab_size", 30522) if (Path(model) / "config.json").is_file() else 30522
    return cls.open(spec, path, device, threads=threads, vocab_size=vocab, folder=None if artifact else Path(model),
                    session_config=session_config)
