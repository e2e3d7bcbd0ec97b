"""Every command that writes an output folder saves its resolved configuration in it (`run_config.json`),
with the values of its command line: export (an export folder and a Triton model repository) and bench
here; finetune/compress in test_train.py, sweep in test_sweep.py, loadtest in test_serve_cli.py."""
import json

import pytest
from click.testing import CliRunner

from theseus_deploy.artifact import ExportFolder
from theseus_deploy.cli import cli


def run_config(folder):
    return json.loads((folder / "run_config.json").read_text())


@pytest.fixture(scope="module")
def export_folder(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("runcfg") / "exp"
    r = CliRunner().invoke(cli, ["export", "--model", str(tiny_bert), "--format", "onnx", "--output", str(out),
                                 "--max-batch-size", "4", "--max-seq-length", "64", "--atol", "0.001"])
    assert r.exit_code == 0, r.output
    return out


def test_export_folder_holds_its_run_config_outside_the_manifest(export_folder, tiny_bert):
    cfg = run_config(export_folder)
    assert cfg["command"] == "export" and cfg["model"] == str(tiny_bert) and cfg["output"] == str(export_folder)
    assert cfg["formats"] == ["onnx"] and cfg["atol"] == 0.001 and cfg["opset"] == 17
    assert cfg["profile"]["max_batch_size"] == 4 and cfg["profile"]["max_seq_length"] == 64
    # not an artifact: the manifest lists the model only, and the folder still reads and loads as before
    folder = ExportFolder.read(export_folder)
    assert [a.file for a in folder.artifacts] == ["model.onnx"] and folder.resolve("onnx").name == "model.onnx"


def test_export_resolves_the_default_sequence_length(tiny_bert, tmp_path):
    """No --max-seq-length: the length the profile was built with (512, the tiny model has 514 positions)."""
    out = tmp_path / "exp"
    r = CliRunner().invoke(cli, ["export", "--model", str(tiny_bert), "--format", "onnx", "--output", str(out),
                                 "--no-validate"])
    assert r.exit_code == 0, r.output
    cfg = run_config(out)
    assert cfg["profile"]["max_seq_length"] == 512 == json.loads((out / "manifest.json").read_text())["profile"]["max"][1]
    assert cfg["validate"] is False


def test_triton_repository_holds_its_run_config_at_the_root(export_folder, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from theseus_deploy.export.triton import validate_repository

    repo = tmp_path / "repo"
    r = CliRunner().invoke(cli, ["export", "--model", str(export_folder), "--format", "triton", "--output", str(repo),
                                 "--max-batch-size", "4", "--triton-max-length", "32", "--triton-instances", "2"])
    assert r.exit_code == 0, r.output
    cfg = run_config(repo)
    assert cfg["command"] == "export" and cfg["formats"] == ["triton"] and cfg["model"] == str(export_folder)
    assert cfg["triton"]["max_length"] == 32 and cfg["triton"]["instances"] == 2
    assert cfg["profile"]["max_batch_size"] == 4
    # Triton reads models from the sub-folders only: the repository stays valid, no model dir is added
    validate_repository(repo)
    assert {p.name for p in repo.iterdir() if p.is_dir()} == set(json.loads((repo / "manifest.json").read_text())["models"])


def test_bench_results_hold_their_run_config(tiny_bert, tmp_path):
    out = tmp_path / "b"
    r = CliRunner().invoke(cli, ["bench", "--model", str(tiny_bert), "--backend", "torch", "--batch-sizes", "1,2",
                                 "--seq-lens", "16", "--warmup", "0", "--iterations", "2", "--min-seconds", "0",
                                 "--rounds", "1", "--threads", "1", "--output", str(out)])
    assert r.exit_code == 0, r.output
    cfg = run_config(out)
    assert cfg["command"] == "bench" and cfg["models"] == [str(tiny_bert)] and cfg["backends"] == ["torch"]
    assert (cfg["batch_sizes"], cfg["seq_lens"], cfg["iterations"], cfg["rounds"], cfg["threads"]) == ("1,2", "16", 2, 1, 1)
    assert cfg["output"] == str(out) and cfg["traffic"]["batch_size"] == 32  # a group, with its default
