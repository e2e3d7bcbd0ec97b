"""The export folder as a typed object: the one owner of `manifest.json`.

    folder = ExportFolder.read("exports/succ")          # schema checked, version checked
    path = folder.resolve("onnx-int8")                  # listed, confined, sha256-checked
    write_manifest(tmp, manifest)                       # what `export` writes (version added)

Only artifacts the manifest lists are ever loaded: there is no fallback to a default file name
(an unlisted `model.onnx`, perhaps a symlink to elsewhere, is never opened). A listed file must be
a plain relative name that resolves inside the folder (no absolute path, no `..`, no symlink out)
and its sha256 must match the manifest's (`verify_hash=False` skips only the hash).

Manifest schema (version 1): {"version": 1, "source_model", "model_type", "num_layers", "opset",
"profile": {"min", "opt", "max"}, "input_names", "output_names", "artifacts": [{"format", "file"
(null for load-time formats), "sha256", "bytes", "validation", ...}], "versions", "created"}.
Folders written before the version field existed read as version 1 (the same layout).
Standard library only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import io
from .errors import UsageError
from .io import safe_member, sha256_file
from .registry import BACKENDS

MANIFEST = "manifest.json"
VERSION = 1


def is_export_folder(path: str | os.PathLike) -> bool:
    """A folder that has a manifest (whatever its state: `ExportFolder.read` checks it)."""
    return (Path(path) / MANIFEST).exists()


@dataclass(frozen=True)
class Artifact:
    """One listed artifact of an export folder."""

    format: str
    file: str | None
    sha256: str | None = None
    entry: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ExportFolder:
    path: Path
    manifest: dict

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "ExportFolder":
        """Read and check `folder/manifest.json` (UsageError naming the file on anything malformed)."""
        folder = Path(folder)
        where = folder / MANIFEST
        if not where.is_file():
            raise UsageError(f"{folder} is not an export folder ({MANIFEST} missing or not a file)")
        try:
            m = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise UsageError(f"{where} is not readable JSON: {e}") from None
        if not isinstance(m, dict) or not isinstance(m.get("artifacts", []), list):
            raise UsageError(f"{where}: not an export manifest")
        version = m.get("version", VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise UsageError(f"{where}: invalid manifest version {version!r}")
        if version > VERSION:
            raise UsageError(f"{where}: manifest version {version} is newer than this theseus-deploy reads "
                             f"({VERSION}); upgrade theseus-deploy")
        for i, a in enumerate(m.get("artifacts", [])):
            if not isinstance(a, dict) or not isinstance(a.get("format"), str):
                raise UsageError(f"{where}: artifacts[{i}] is not an artifact entry (needs a \"format\")")
            if a.get("file") is not None and not isinstance(a.get("file"), str):
                raise UsageError(f"{where}: artifacts[{i}].file must be a file name, got {a.get('file')!r}")
            if a.get("sha256") is not None and not isinstance(a.get("sha256"), str):
                raise UsageError(f"{where}: artifacts[{i}].sha256 must be a hex string")
        for key in ("input_names", "output_names"):
            names = m.get(key)
            if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise UsageError(f"{where}: {key} must be a list of names")
        prof = m.get("profile")
        if prof is not None and not (isinstance(prof, dict) and all(
                isinstance(prof.get(k), list) and len(prof[k]) == 2 and all(isinstance(x, int) for x in prof[k])
                for k in ("min", "opt", "max"))):
            raise UsageError(f"{where}: profile must hold min/opt/max [batch, sequence] pairs")
        return cls(folder, m)

    @property
    def artifacts(self) -> list[Artifact]:
        return [Artifact(a["format"], a.get("file"), a.get("sha256"), a) for a in self.manifest.get("artifacts", [])]

    @property
    def formats(self) -> list[str]:
        return [a.format for a in self.artifacts]

    @property
    def backends(self) -> list[str]:
        """The backends that run this folder's artifacts (from the registry), in manifest order."""
        have = {a.format for a in self.artifacts if a.file}
        return [b.name for b in BACKENDS.values() if b.format in have]

    def artifact(self, fmt: str) -> Artifact:
        for a in self.artifacts:
            if a.format == fmt and a.file:
                return a
        listed = ", ".join(a.format for a in self.artifacts if a.file) or "none"
        raise UsageError(f"{self.path}/{MANIFEST} lists no {fmt} artifact (it lists: {listed}): "
                         f"run `theseus-deploy export --format {fmt}` first")

    def resolve(self, fmt: str, verify_hash: bool = True) -> Path:
        """The file of format `fmt`: listed, inside the folder, and (verify_hash) its sha256 checked."""
        a = self.artifact(fmt)
        path = safe_member(self.path, a.file, "artifact")
        if not path.is_file():
            raise UsageError(f"{self.path}: artifact {a.file} listed in {MANIFEST} is missing")
        if verify_hash:
            check_hash(path, a.sha256, self.path)
        return path


def check_hash(path: Path, want: str | None, folder: Path | None = None) -> str:
    """The file's sha256; UsageError unless it equals `want` (the manifest's)."""
    where = f"{folder}/{MANIFEST}" if folder is not None else MANIFEST
    if not want:
        raise UsageError(f"{where} records no sha256 for {Path(path).name} (verify_hash=False to load it unchecked)")
    got = sha256_file(path)
    if got != want:
        raise UsageError(f"{path}: sha256 does not match {MANIFEST} (file changed or corrupt; "
                         "verify_hash=False to load it anyway)")
    return got


def resolve_artifact(folder: str | os.PathLike, fmt: str, verify_hash: bool = True) -> Path:
    """`ExportFolder.read(folder).resolve(fmt, verify_hash)`."""
    return ExportFolder.read(folder).resolve(fmt, verify_hash)


def write_manifest(folder: str | os.PathLike, manifest: dict) -> dict:
    """Write `folder/manifest.json` (atomically, through `io.write_json`) with the schema version first;
    returns what was written."""
    out = {"version": VERSION, **{k: v for k, v in manifest.items() if k != "version"}}
    io.write_json(Path(folder) / MANIFEST, out)
    return out
