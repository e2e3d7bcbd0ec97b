"""Run configurations. Each field's `help` becomes the CLI's --help; the resolved config is
saved beside every output (`run_config.json`) so a run can be read back and repeated.

Only the standard library is imported here: `theseus-deploy --help` must stay instant.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def opt(default, help: str, choices=None, flag: str | None = None, multiple: bool = False):
    """A dataclass field that also describes its CLI option."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "multiple": multiple})


@dataclass
class DataConfig:
    """Where the examples come from: a GLUE task (local glue_data folder or the hub), or the user's own files."""

    task: str = opt(None, "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) or 'custom'.")
    data_dir: str | None = opt(None, "Local glue_data folder. Default: $THESEUS_DATA_DIR, else ../shared/data/glue if it exists, else the hub.")
    train_file: str | None = opt(None, "--task custom: training file (.csv, .tsv, .json/.jsonl).")
    validation_file: str | None = opt(None, "--task custom: validation file (.csv, .tsv, .json/.jsonl).")
    text_columns: str | None = opt(None, "--task custom: one or two text columns, comma-separated (a or a,b).")
    label_column: str | None = opt(None, "--task custom: the label column.")
    problem_type: str = opt("auto", "--task custom: classification, regression, or auto (inferred from the labels).",
                            choices=["auto", "classification", "regression"])
    max_seq_length: int = opt(128, "Truncate inputs to this many tokens.")
    max_train_samples: int | None = opt(None, "Use only the first N training examples (quick runs).")
    max_eval_samples: int | None = opt(None, "Use only the first N evaluation examples (quick runs).")


@dataclass
class TrainConfig(DataConfig):
    """Shared by finetune and compress."""

    model: str = opt(None, "Model: a local folder or a hub id.")
    output: str = opt(None, "Output folder (a plain Hugging Face model folder).")
    epochs: float | None = opt(None, "Training epochs. Default: scaled with the data set (see README).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).")
    lr: float | None = opt(None, "Peak learning rate (AdamW, linear warm-up then decay).")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    warmup_ratio: float = opt(0.06, "Fraction of steps for linear warm-up.")
    batch_size: int = opt(32, "Training batch size (per device).")
    eval_batch_size: int = opt(64, "Evaluation batch size.")
    eval_steps: int | None = opt(None, "Evaluate on dev every N steps (default: once per epoch); the best checkpoint is kept.")
    save_steps: int | None = opt(None, "Write a resumable checkpoint every N steps (default: same as --eval-steps).")
    early_stopping_patience: int | None = opt(None, "Stop after this many evaluations without improvement.")
    seed: int = opt(42, "Random seed (data order, dropout, replacement draws).")
    mixed_precision: str = opt("no", "Mixed precision via accelerate.", choices=["no", "fp16", "bf16"])
    overwrite: bool = opt(False, "Replace a non-empty output folder.")
    log_steps: int = opt(10, "Log training loss every N steps.")


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tune a pretrained encoder (or re-fine-tune a classifier) on a task: this gives the predecessor."""

    # Plain fine-tuning learns fast: 3 epochs is the BERT paper's budget, with a floor in steps
    # so that tiny data sets still get enough updates.
    min_steps: int = opt(300, "Default budget: at least this many steps (epochs grow on small data, up to --max-epochs).")
    max_epochs: int = opt(10, "Cap on the epochs chosen by the default budget.")
    freeze_layers: int = opt(0, "Freeze embeddings and the bottom N layers (0: train everything).")
    keep_layers: int | None = opt(None, "Keep only the bottom N layers before training (the truncation baseline).")


@dataclass
class CompressConfig(TrainConfig):
    """Compress a fine-tuned predecessor into a shallower successor with BERT-of-Theseus."""

    successor_layers: int | None = opt(None, "Successor depth n (default: half the predecessor's layers, rounded up).")
    init: str = opt("bottom", "Successor initialisation: the predecessor's bottom n layers (paper), top n, or uniformly spaced.",
                    choices=["bottom", "top", "uniform"])
    scheduler: str = opt("linear", "Replacement-rate schedule: linear p=min(1,k*t+b); constant p=b then 1; anti (decreasing, ablation).",
                         choices=["linear", "constant", "anti"])
    replacing_rate: float = opt(0.3, "b: the replacement probability at step 0 (paper: 0.3).")
    steps_to_full: int | None = opt(None, "Steps until p reaches 1 (default: half the training steps).")
    k: float | None = opt(None, "Slope k of the linear schedule (instead of --steps-to-full).")
    unfreeze_head: bool = opt(False, "Train the pooler/classifier too once p has reached 1 (successor-only phase).")
    # The frozen head makes Theseus slower to converge than fine-tuning (MRPC, MiniLM 6->3: 3
    # epochs stayed at the majority class, 10 epochs learned): a larger floor in steps.
    min_steps: int = opt(1500, "Default budget: at least this many steps (epochs grow on small data, up to --max-epochs).")
    max_epochs: int = opt(20, "Cap on the epochs chosen by the default budget.")
    resume: bool = opt(False, "Continue from the last checkpoint in <output>.partial/ with the same schedule.")


@dataclass
class EvaluateConfig(DataConfig):
    """Score a model on a task's dev (or train) split."""

    model: str = opt(None, "Model: a local folder or a hub id.")
    split: str = opt("dev", "Split to score: dev (MNLI: dev = matched), dev_mismatched (MNLI), or train.",
                     choices=["dev", "dev_mismatched", "train"])
    batch_size: int = opt(64, "Evaluation batch size.")
    json: bool = opt(False, "Print the metrics as JSON.")
    output: str | None = opt(None, "Also write the metrics JSON to this file.")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Defaults that apply when the user gave none (recorded in the resolved config).
DEFAULT_LR = {"finetune": 2e-5, "compress": 1e-4}
