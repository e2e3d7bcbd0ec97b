"""Tiny random models shared by every test: 2-4 layers, hidden 32, real BERT tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("THESEUS_SHARED", REPO.parent / "shared"))
BERT_TOKENIZER = SHARED / "models" / "bert-base-uncased"
GLUE_DIR = SHARED / "data" / "glue"


from tiny import make_tiny_model, tiny_config  # noqa: E402,F401


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


# ------------------------------------------------------------------ synthetic GLUE (real layouts)
def write_synthetic_glue(root: Path) -> Path:
    """Small made-up GLUE folders in the official glue_data layouts (see ../shared/README.md):
    CoLA without header (source, label, original mark, sentence), MRPC with a UTF-8 BOM before
    its header and unbalanced quotes in the text, STS-B's 10 columns with float scores, RTE with
    string labels, SST-2 with a trailing space before the tab. Rows are invented, not copied."""
    root = Path(root)
    words = "the a cat dog sat ran on under mat road big small".split()

    def sent(i, n=5):
        return " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(n)).capitalize() + "."

    files = {
        ("CoLA", "train.tsv"): [f"src{i % 3}\t{i % 2}\t{'' if i % 2 else '*'}\t{sent(i)}" for i in range(8)],
        ("CoLA", "dev.tsv"): [f"src{i % 3}\t{i % 2}\t{'' if i % 2 else '*'}\t{sent(i + 50)}" for i in range(4)],
        ("MRPC", "train.tsv"): ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        + [f"{i % 2}\t{100 + i}\t{200 + i}\t\"{sent(i)}\t{sent(i + 1)}" for i in range(8)],
        ("MRPC", "dev.tsv"): ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        + [f"{(i + 1) % 2}\t{300 + i}\t{400 + i}\t{sent(i + 20)}\t\"{sent(i + 21)}" for i in range(4)],
        ("STS-B", "train.tsv"): ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
        + [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{sent(i)}\t{sent(i + 2)}\t{i * 0.625:.3f}" for i in range(8)],
        ("STS-B", "dev.tsv"): ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
        + [f"{i}\tmain-forums\tMSRpar\t2012train\t{i:04d}\tnone\tnone\t{sent(i + 30)}\t{sent(i + 31)}\t{5 - i * 1.25:.3f}" for i in range(4)],
        ("RTE", "train.tsv"): ["index\tsentence1\tsentence2\tlabel"]
        + [f"{i}\t{sent(i, 9)}\t{sent(i + 4)}\t{['entailment', 'not_entailment'][i % 2]}" for i in range(8)],
        ("RTE", "dev.tsv"): ["index\tsentence1\tsentence2\tlabel"]
        + [f"{i}\t{sent(i + 60, 9)}\t{sent(i + 64)}\t{['not_entailment', 'entailment'][i % 2]}" for i in range(4)],
        ("SST-2", "train.tsv"): ["sentence\tlabel"] + [f"{sent(i).lower()[:-1]} \t{i % 2}" for i in range(8)],
        ("SST-2", "dev.tsv"): ["sentence\tlabel"] + [f"{sent(i + 70).lower()[:-1]} \t{(i + 1) % 2}" for i in range(4)],
    }
    for (folder, name), lines in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def synthetic_glue(tmp_path_factory) -> Path:
    return write_synthetic_glue(tmp_path_factory.mktemp("glue"))
