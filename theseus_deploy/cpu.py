"""What the CPU can do, as far as our defaults depend on it. Standard library only.

INT8 on x86: ONNX Runtime's dynamic-quantisation kernels multiply u8 activations by s8 weights.
With VNNI (AVX512-VNNI, AVX-VNNI) or AMX-INT8 they accumulate in int32. With AVX2 only they use
`vpmaddubsw`, which adds each pair of u8 x s8 products into an int16 *with saturation*: two
products of 255 x 127 (32385 each) overflow it. ONNX Runtime's documentation advises 7-bit weights
(`reduce_range`) there: 2 x 255 x 63 = 32130 fits. Measured on a tiny RoBERTa (tests/conftest.py,
validation shape 3x37), the same 8-bit artifact gave a max |logit diff| vs PyTorch of 0.00029 on an
AMX machine and 0.00784 on AVX2 (an AMD EPYC, and the same AMX machine emulating a Haswell with
`qemu-x86_64 -cpu Haswell-v4`): saturation, 27x the error. Built with `reduce_range` the AVX2 run's
logits were bit-identical to the AMX machine's (0.00030). Hence `export --int8-reduce-range`
defaults to "auto": on where the CPU lacks these instructions.
"""
from __future__ import annotations

import platform

# /proc/cpuinfo flag names of the instructions that give ONNX Runtime's u8 x s8 kernels int32 accumulation.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags() -> set:
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def int8_dot_product() -> list[str]:
    """The INT8 dot-product instruction sets this CPU has (empty on an AVX2-only x86)."""
    flags = cpu_flags()
    return [f for f in INT8_DOT_FLAGS if f in flags]


def int8_reduce_range_default() -> tuple[bool, str]:
    """(reduce_range, why) for ONNX Runtime INT8 on this machine: 7-bit weights on an x86 CPU without
    VNNI/AMX (where 8-bit weights saturate), 8-bit elsewhere (ARM's kernels do not saturate)."""
    if not is_x86():
        return False, f"auto: {platform.machine()} (the u8 x s8 saturation is x86-only)"
    have = int8_dot_product()
    if have:
        return False, f"auto: the CPU has {', '.join(have)}"
    if not cpu_flags():
        return True, "auto: the CPU's instruction sets are unknown (no /proc/cpuinfo): 7-bit weights are safe everywhere"
    return True, "auto: the CPU has no VNNI/AMX-INT8 (8-bit weights would saturate ONNX Runtime's AVX2 kernels)"
