"""The export folder (theseus_deploy.artifact): only listed, confined, hashed artifacts are loaded;
a file that is not what its format says is one error naming it; the manifest schema is checked."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from theseus_deploy.config import ExportConfig

from theseus_deploy.artifact import VERSION, ExportFolder
from theseus_deploy.errors import UsageError
from theseus_deploy.registry import BACKENDS
from theseus_deploy.runtime import TextClassifier, load_runner


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory):
    from theseus_deploy.export.api import export_model

    out = tmp_path_factory.mktemp("art") / "e"
    export_model(ExportConfig.of(model=str(tiny_bert), formats=["onnx"], output=str(out), max_seq_length=32))
    return out


def _copy(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        m = json.loads((dst / "manifest.json").read_text())
        edit(m)
        (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_manifest_has_a_version_and_is_read_back(exported):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["version"] == VERSION
    folder = ExportFolder.read(exported)
    assert folder.formats == ["onnx"]
    assert folder.backends == [b.name for b in BACKENDS.values() if b.format == "onnx"] and "onnx" in folder.backends
    assert folder.resolve("onnx") == (exported / "model.onnx").resolve()


def test_unlisted_artifact_is_never_loaded(exported, tmp_path):
    """A manifest without the backend's entry: the default file name is not a fallback (here a
    model.onnx symlinked outside the folder, which the old fallback loaded and classified with)."""
    (tmp_path / "outside").mkdir()
    shutil.copy(exported / "model.onnx", tmp_path / "outside" / "model.onnx")
    folder = _copy(exported, tmp_path / "unlisted", lambda m: m.update(artifacts=[]))
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(tmp_path / "outside" / "model.onnx")
    for verify in (True, False):
        with pytest.raises(UsageError, match="lists no onnx artifact"):
            load_runner(str(folder), "onnx", verify_hash=verify)
        with pytest.raises(UsageError, match="lists no onnx artifact"):
            TextClassifier.load(str(folder), backend="onnx", verify_hash=verify)


def test_manifest_that_is_not_a_file_loads_nothing(exported, tmp_path):
    folder = _copy(exported, tmp_path / "nodir")
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").mkdir()
    with pytest.raises(UsageError, match="not an export folder"):
        load_runner(str(folder), "onnx")
    folder = _copy(exported, tmp_path / "none")
    (folder / "manifest.json").unlink()
    with pytest.raises(UsageError, match="not an export folder"):
        load_runner(str(folder), "onnx")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(artifacts={"onnx": "model.onnx"}), "not an export manifest"),
    (lambda m: m.update(artifacts=["model.onnx"]), r"artifacts\[0\] is not an artifact entry"),
    (lambda m: m["artifacts"][0].update(file=7), r"artifacts\[0\].file must be a file name"),
    (lambda m: m["artifacts"][0].update(sha256=["x"]), "sha256 must be a hex string"),
    (lambda m: m.update(version=VERSION + 1), "newer than this theseus-deploy reads"),
    (lambda m: m.update(version="1"), "invalid manifest version"),
    (lambda m: m.update(profile={"min": 1}), "profile must hold"),
    (lambda m: m.update(input_names="input_ids"), "input_names must be a list"),
])
def test_malformed_manifest_is_refused_naming_it(exported, tmp_path, edit, match):
    folder = _copy(exported, tmp_path / "bad", edit)
    with pytest.raises(UsageError, match=match):
        load_runner(str(folder), "onnx")


def test_listed_file_that_is_not_onnx_is_one_error_naming_it(exported, tmp_path):
    """Its sha256 matches the manifest (so the hash check passes): ONNX Runtime's protobuf error
    becomes one UsageError naming the file."""
    junk = b"this is not an ONNX graph\n" * 10

    def edit(m):
        m["artifacts"][0]["sha256"] = hashlib.sha256(junk).hexdigest()

    folder = _copy(exported, tmp_path / "junk", edit)
    (folder / "model.onnx").write_bytes(junk)
    with pytest.raises(UsageError, match=r"model\.onnx: not a loadable ONNX graph"):
        load_runner(str(folder), "onnx")
    with pytest.raises(UsageError, match=r"model\.onnx: not a loadable ONNX graph"):
        TextClassifier.load(str(folder), backend="onnx")


# ------------------------------------------------------------------ the same guarantees, as a user meets them
def _cli(*argv, cwd=None):
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "theseus_deploy", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _one_error(r, match):
    import re

    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and lines and lines[-1].startswith("error:"), r.stderr[-2000:]
    assert re.search(match, lines[-1]), lines[-1]


BENCH = ["--batch-sizes", "1", "--seq-lens", "8", "--rounds", "1", "--iterations", "1", "--min-seconds", "0",
         "--warmup", "0"]


def test_bench_of_a_folder_with_an_unlisted_or_junk_artifact_is_one_error(exported, tmp_path):
    (tmp_path / "outside").mkdir()
    shutil.copy(exported / "model.onnx", tmp_path / "outside" / "model.onnx")
    unlisted = _copy(exported, tmp_path / "unlisted", lambda m: m.update(artifacts=[]))
    (unlisted / "model.onnx").unlink()
    (unlisted / "model.onnx").symlink_to(tmp_path / "outside" / "model.onnx")
    r = _cli("bench", "--model", str(unlisted), "--backend", "onnx", *BENCH, "--output", str(tmp_path / "o1"))
    _one_error(r, r"holds no artifact for onnx")
    r = _cli("bench", "--model", str(unlisted), *BENCH, "--output", str(tmp_path / "o2"))
    _one_error(r, r"no artifact of its manifest")

    junk = b"not an onnx graph\n" * 8
    bad = _copy(exported, tmp_path / "junk", lambda m: m["artifacts"][0].update(sha256=hashlib.sha256(junk).hexdigest()))
    (bad / "model.onnx").write_bytes(junk)
    r = _cli("bench", "--model", str(bad), *BENCH, "--output", str(tmp_path / "o3"))
    _one_error(r, r"junk/model\.onnx: not a loadable ONNX graph")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
