"""INT8 on any x86 CPU: the reduce_range default follows the CPU (theseus_deploy/cpu.py), is recorded,
and can be forced both ways; on an emulated AVX2-only CPU the default artifact computes what it
computes on this machine (no u8 x s8 saturation)."""
import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import theseus_deploy.cpu as cpu
from conftest import REPO
from theseus_deploy.cli import cli

AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}


def _int8(manifest):
    return next(a for a in manifest["artifacts"] if a["format"] == "onnx-int8")["quantization"]


@pytest.mark.parametrize("flags, want", [(AVX2_ONLY, True), (AVX2_ONLY | {"avx512f", "avx512_vnni"}, False),
                                         (AVX2_ONLY | {"avx_vnni"}, False), (AVX2_ONLY | {"amx_int8"}, False)])
def test_the_default_follows_the_cpu(flags, want, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(cpu, "is_x86", lambda: True)
    rr, why = cpu.int8_reduce_range_default()
    assert rr is want and why.startswith("auto: ")


def test_the_flag_pair_overrides_and_the_manifest_records(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: set(AVX2_ONLY))  # an AVX2-only machine
    base = ["export", "--model", str(tiny_bert), "--format", "onnx-int8", "--max-seq-length", "32"]
    seen = {}
    for name, extra in (("auto", []), ("off", ["--no-int8-reduce-range"]), ("on", ["--int8-reduce-range"])):
        r = CliRunner().invoke(cli, [*base, "--output", str(tmp_path / name), *extra, "--no-validate"])
        assert r.exit_code == 0, r.output
        seen[name] = _int8(json.loads((tmp_path / name / "manifest.json").read_text()))
    assert seen["auto"]["reduce_range"] is True and "no VNNI" in seen["auto"]["reduce_range_chosen_by"]
    assert seen["auto"]["built_on_cpu_int8"] == ["none (AVX2 or older)"]
    assert seen["off"]["reduce_range"] is False and seen["off"]["reduce_range_chosen_by"] == "--no-int8-reduce-range"
    assert seen["on"]["reduce_range"] is True and seen["on"]["reduce_range_chosen_by"] == "--int8-reduce-range"


RUN_INT8 = r"""
import sys, numpy as np, onnxruntime as ort
sys.path.insert(0, sys.argv[3])
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[2]))
np.save(sys.argv[2] + ".out.npy", s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})[0])
"""


@pytest.mark.skipif(not shutil.which("qemu-x86_64") or platform.machine() != "x86_64",
                    reason="needs qemu-user (apt-get install qemu-user) to emulate an AVX2-only CPU")
def test_on_an_emulated_avx2_cpu_the_default_artifact_does_not_saturate(tiny_roberta, tmp_path, monkeypatch):
    """qemu-x86_64 -cpu Haswell-v4: no AVX512, no VNNI, so ONNX Runtime takes its AVX2 u8 x s8 kernels
    (CPUID is emulated; /proc/cpuinfo is the host's, hence the export sees AVX2 through cpu_flags).
    The export's default on such a CPU must give the logits this machine's VNNI/AMX kernels give, bit for
    bit; 8-bit weights there gave 0.00784 vs 0.00029 (the failure this default fixes)."""
    from theseus_deploy.config import ExportConfig
    from theseus_deploy.export.api import export_model
    from theseus_deploy.runtime import random_inputs

    monkeypatch.setattr(cpu, "cpu_flags", lambda: set(AVX2_ONLY))
    out = tmp_path / "e"
    export_model(ExportConfig.of(model=str(tiny_roberta), formats=["onnx-int8"], output=str(out), max_seq_length=64,
                                 validate=False))
    names = json.loads((out / "manifest.json").read_text())["input_names"]
    feeds = random_inputs(3, 37, json.loads((out / "config.json").read_text())["vocab_size"], names, seed=101, padded=True)
    results = {}
    for where, prefix in (("host", []), ("haswell", ["qemu-x86_64", "-cpu", "Haswell-v4"])):
        np.savez(tmp_path / f"{where}.npz", **feeds)
        r = subprocess.run([*prefix, sys.executable, "-c", RUN_INT8, str(out / "model-int8.onnx"),
                            str(tmp_path / f"{where}.npz"), str(REPO)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        results[where] = np.load(tmp_path / f"{where}.npz.out.npy")
    assert np.array_equal(results["host"], results["haswell"]), np.abs(results["host"] - results["haswell"]).max()
