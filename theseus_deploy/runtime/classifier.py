"""`TextClassifier`: tokenizer + runner, classify raw text with any backend."""
from __future__ import annotations

import numpy as np

from theseus_deploy.hf import load_config, load_tokenizer

from .base import Runner
from .loader import load_runner


class TextClassifier:
    """Tokenizer + runner: classify raw text with any backend."""

    def __init__(self, tokenizer, runner: Runner, id2label: dict, max_length: int = 128):
        self.tokenizer, self.runner, self.id2label, self.max_length = tokenizer, runner, id2label, max_length

    @classmethod
    def load(cls, model: str, backend: str = "torch", device: str = "cpu", artifact: str | None = None,
             max_length: int = 128, threads: int | None = None, verify_hash: bool = True,
             seq_bucket: int = 32, session_config: str = "default") -> "TextClassifier":
        """`verify_hash`: check the artifact against the sha256 in manifest.json (see `load_runner`);
        `seq_bucket`: the sequence bucket of torch-compile* backends; `session_config`: ONNX Runtime
        session options (default or latency)."""
        config = load_config(model)
        runner = load_runner(model, backend, device, threads, artifact, verify_hash=verify_hash, seq_bucket=seq_bucket,
                             session_config=session_config)
        return cls(load_tokenizer(model), runner, {int(k): v for k, v in config.id2label.items()}, max_length)

    def warmup(self, shapes) -> list:
        """Run (for torch-compile*: compile) each (batch, seq) shape once before serving; else
        each new shape (bucket) is compiled on first use. Returns the shapes (buckets) met."""
        return self.runner.warmup(shapes)

    def __call__(self, texts, text_pairs=None) -> list[dict]:
        if isinstance(texts, str):
            texts = [texts]
            text_pairs = [text_pairs] if isinstance(text_pairs, str) else text_pairs
        enc = self.tokenizer(list(texts), text_pairs, truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="np")
        logits = self.runner.logits(self.runner.encode(dict(enc)))
        if logits.shape[-1] == 1:
            return [{"label": "score", "score": float(v)} for v in logits[:, 0]]
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        return [{"label": self.id2label.get(int(i), str(int(i))), "score": float(p[i])}
                for p, i in zip(probs, probs.argmax(-1))]
