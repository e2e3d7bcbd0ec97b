"""What every runner shares: the Runner interface, random inputs, the device check.

A runner takes native feeds (`make_inputs` / `encode`), runs one forward with `__call__` (what a
timer times; results may stay on the device), and returns fp32 numpy logits with `logits`.
"""
from __future__ import annotations

import numpy as np

from theseus_deploy.errors import UsageError
from theseus_deploy.registry import BACKENDS, DEVICES


def random_inputs(batch_size: int, seq_len: int, vocab_size: int, names, seed: int = 0, padded: bool = False) -> dict:
    """Random token ids (numpy int64) for the input `names`; `padded`: rows 1.. get random lengths,
    zero ids and mask beyond them (a right-padded batch, as a tokenizer makes it), so the mask
    handling is exercised too. Used for validation (export) and timing (bench)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000 if vocab_size > 2000 else 5, vocab_size - 1, size=(batch_size, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    if padded:
        for row in range(1, batch_size):
            length = int(rng.integers(max(1, seq_len // 3), seq_len + 1))
            ids[row, length:], mask[row, length:] = 0, 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: feeds[n] for n in names}


def check_device(backend: str, device: str) -> None:
    """UsageError unless `backend` runs on `device` (from the registry)."""
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}' ({', '.join(DEVICES)})")
    spec = BACKENDS.get(backend)  # export validates formats (e.g. onnx-fp16-trt) on the CPU session too
    if spec is not None and device not in spec.devices:
        raise UsageError(f"backend {backend} ({spec.help}) needs --device {' or '.join(spec.devices)}")


class Runner:
    name: str
    backend: str
    device: str
    input_names: list
    vocab_size: int

    def make_inputs(self, batch_size: int, seq_len: int, seed: int = 0):
        return self.encode(random_inputs(batch_size, seq_len, self.vocab_size, self.input_names, seed))

    def encode(self, encoded: dict):
        raise NotImplementedError

    def __call__(self, feeds) -> None:
        raise NotImplementedError

    def logits(self, feeds) -> np.ndarray:
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def warmup(self, shapes) -> list:
        """Run each (batch, seq) shape once, untimed; returns the shapes met."""
        for b, s in shapes:
            self.logits(self.make_inputs(b, s))
        self.synchronize()
        return [tuple(x) for x in shapes]
