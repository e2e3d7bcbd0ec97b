"""Tiny random classifiers (for tests, smoke benchmarks and trying the CLI without weights).

    python -m theseus_deploy.tiny OUT [--arch bert|roberta|mpnet] [--layers 4] [--hidden 32]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

SHARED = Path(os.environ.get("THESEUS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TOKENIZER = os.environ.get("THESEUS_TINY_TOKENIZER", str(SHARED / "models" / "bert-base-uncased"))


def tiny_config(arch: str = "bert", layers: int = 4, num_labels: int = 2, hidden: int = 32):
    from transformers import BertConfig, MPNetConfig, RobertaConfig

    common = dict(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=2 * hidden, max_position_embeddings=514, num_labels=num_labels,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    if arch == "bert":
        return BertConfig(**common)
    if arch == "roberta":
        return RobertaConfig(**common, type_vocab_size=1, pad_token_id=0)
    if arch == "mpnet":
        return MPNetConfig(**common, pad_token_id=0)
    raise ValueError(f"unknown arch {arch}")


def make_tiny_model(path, arch: str = "bert", layers: int = 4, num_labels: int = 2, seed: int = 0,
                    hidden: int = 32) -> Path:
    """Save a random tiny `*ForSequenceClassification` plus the BERT tokenizer to `path`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch, layers, num_labels, hidden))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(path)
    return Path(path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arch", default="bert")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_tiny_model(a.out, a.arch, a.layers, seed=a.seed, hidden=a.hidden))
