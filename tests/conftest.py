"""Tiny random models shared by every test: 2-4 layers, hidden 32, real BERT tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("THESEUS_SHARED", REPO.parent / "shared"))
BERT_TOKENIZER = SHARED / "models" / "bert-base-uncased"
GLUE_DIR = SHARED / "data" / "glue"


def tiny_config(arch: str = "bert", layers: int = 4, num_labels: int = 2):
    from transformers import BertConfig, MPNetConfig, RobertaConfig

    common = dict(
        vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=514, num_labels=num_labels,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    if arch == "bert":
        return BertConfig(**common)
    if arch == "roberta":
        return RobertaConfig(**common, type_vocab_size=1, pad_token_id=0)
    if arch == "mpnet":
        return MPNetConfig(**common, pad_token_id=0)
    raise ValueError(arch)


def make_tiny_model(path: Path, arch: str = "bert", layers: int = 4, num_labels: int = 2, seed: int = 0) -> Path:
    """Save a random tiny `*ForSequenceClassification` plus the BERT tokenizer to `path`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch, layers, num_labels))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(BERT_TOKENIZER).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bert", "bert", 4)


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-roberta", "roberta", 4)


@pytest.fixture(scope="session")
def tiny_mpnet(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-mpnet", "mpnet", 4)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR
