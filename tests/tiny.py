"""Tiny random classifiers: the test fixture (also for the smoke bench and trying the CLI without weights).

    python tests/tiny.py OUT [--arch bert|roberta|mpnet] [--layers 4] [--hidden 32]

The real bert-base-uncased tokenizer is taken from $THESEUS_TINY_TOKENIZER, else from
$THESEUS_SHARED/models/bert-base-uncased (default: the workspace's ../shared beside the clone).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

SHARED = Path(os.environ.get("THESEUS_SHARED", Path(__file__).resolve().parents[2] / "shared"))  # tests/ -> clone -> workspace
TOKENIZER = os.environ.get("THESEUS_TINY_TOKENIZER", str(SHARED / "models" / "bert-base-uncased"))

# Where the real BERT tokenizer is not at hand (a clone outside the workspace, no hub), tiny models
# get a small built-in WordPiece vocabulary: whole common words, else characters. Ids stay far below
# the models' vocab_size, so everything that runs on the real tokenizer runs on this one.
_WORDS = ("the a an and or but of to in on at for with by from as is are was were be been it its this that "
          "these those there here he she they we you i me my your his her their our not no yes very too so "
          "movie film plot actor actors scene story music ending time people way thing day great good bad best "
          "worst fun funny boring dull love hate like well just only even more most much many one two all some "
          "what who which when where why how can could will would should do does did has have had make made "
          "see seen watch said says man woman men women world life new old long short first last own same other").split()


def builtin_tokenizer():
    import string

    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *chars, *("##" + c for c in chars)])
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def tiny_tokenizer():
    """The real bert-base-uncased tokenizer from ../shared when present, else the built-in one."""
    from transformers import AutoTokenizer

    if (Path(TOKENIZER) / "tokenizer.json").is_file() or (Path(TOKENIZER) / "vocab.txt").is_file():
        return AutoTokenizer.from_pretrained(TOKENIZER)
    return builtin_tokenizer()


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
                    hidden: int = 32, labels=None) -> Path:
    """Save a random tiny `*ForSequenceClassification` plus a BERT tokenizer (see `tiny_tokenizer`) to `path`.
    `labels`: its label names by id (id2label), e.g. ("equivalent", "not_equivalent") for a model
    whose label order is not the data's."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(arch, layers, num_labels, hidden)
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
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
