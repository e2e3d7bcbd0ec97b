"""Tiny random models shared by every test: 2-4 layers, hidden 32, real BERT tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("THESEUS_SHARED", REPO.parent / "shared"))
BERT_TOKENIZER = SHARED / "models" / "bert-base-uncased"
GLUE_DIR = SHARED / "data" / "glue"


from theseus_deploy.tiny import make_tiny_model, tiny_config  # noqa: E402,F401


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
