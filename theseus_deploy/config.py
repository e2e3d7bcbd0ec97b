"""Run configurations. Each field's `help` becomes the CLI's --help; the resolved config is
saved beside every output (`run_config.json`) so a run can be read back and repeated.

Only the standard library is imported here: `theseus-deploy --help` must stay instant.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from .errors import UsageError
from .registry import BACKENDS, output_names


def opt(default, help: str, choices=None, flag: str | None = None, multiple: bool = False, *,
        resume: bool = False, artifact: bool = False, ge=None, gt=None, le=None, lt=None, allow_inf: bool = False):
    """A dataclass field that also describes its CLI option and what values it accepts.

    flag: the option's name(s) when they differ from the field's (`--format`, `--validate/--no-validate`);
    multiple: a repeatable option (a tuple); resume: the field decides the training trajectory (data
    order, draws, p, lr, what is evaluated and kept), so `--resume` refuses a changed value;
    artifact: the field changes what `export` builds (opset, quantisation), so a resumed sweep
    refuses a changed value (sweep decides on `resume` and `artifact` fields);
    ge/gt/le/lt: bounds checked by `check()` for every command; floats must also be finite
    unless allow_inf.
    """
    meta = {"help": help, "choices": choices, "flag": flag, "multiple": multiple, "resume": resume, "artifact": artifact,
            "ge": ge, "gt": gt, "le": le, "lt": lt, "allow_inf": allow_inf}
    if multiple and default is None:
        default = ()
    return field(default=default, metadata=meta)


def _bounds_text(meta) -> str:
    parts = [f"{sym} {meta[k]}" for k, sym in (("gt", "greater than"), ("ge", "at least"), ("lt", "less than"), ("le", "at most")) if meta[k] is not None]
    return " and ".join(parts)


def group(cls, prefix: str = ""):
    """A nested group of options (a plain dataclass): its fields become the flags `--{prefix}{field}`
    (`int8 = group(Int8Config, "int8_")` gives `--int8-reduce-range`), so related settings travel
    together (`cfg.int8.reduce_range`) while the command line stays flat."""
    return field(default_factory=cls, metadata={"group": cls, "prefix": prefix})


def flat_fields(cls, prefix: str = ""):
    """(flat name, field, type, path) for every option of `cls`, groups flattened with their prefixes:
    what the CLI makes flags of (`int8_reduce_range`, path ("int8", "reduce_range"))."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("group")
        if sub is not None:
            out += [(name, g, tp, (f.name, *path)) for name, g, tp, path in flat_fields(sub, prefix + f.metadata["prefix"])]
        else:
            out.append((prefix + f.name, f, hints[f.name], (f.name,)))
    return out


def from_flat(cls, values: dict, prefix: str = "", _top: bool = True):
    """Build `cls` (groups included) from flat option names (`int8_reduce_range=True`); a name that is
    no option of `cls` is a TypeError, as for the dataclass itself."""
    unknown = sorted(set(values) - {name for name, *_ in flat_fields(cls, prefix)}) if _top else []
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("group")
        if sub is not None:
            kwargs[f.name] = from_flat(sub, values, prefix + f.metadata["prefix"], _top=False)
        elif prefix + f.name in values:
            kwargs[f.name] = values[prefix + f.name]
    return cls(**kwargs)


def to_flat(cfg, prefix: str = "") -> dict:
    """The config's values under their flat option names (the inverse of `from_flat`)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("group") is not None:
            out.update(to_flat(value, prefix + f.metadata["prefix"]))
        else:
            out[prefix + f.name] = value
    return out


def check(cfg, prefix: str = "") -> None:
    """Refuse out-of-range numbers (from each field's metadata) with one UsageError naming the flag."""
    for f in dataclasses.fields(cfg):
        meta, value = f.metadata, getattr(cfg, f.name)
        if meta.get("group") is not None:
            check(value, prefix + meta["prefix"])
            continue
        if not meta or value is None or isinstance(value, bool):
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        flag = "--" + (prefix + f.name).replace("_", "-")
        for v in values:
            if not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and not meta.get("allow_inf"))):
                raise UsageError(f"{flag} must be a finite number, got {v}")
            bad = ((meta.get("ge") is not None and not v >= meta["ge"]) or (meta.get("gt") is not None and not v > meta["gt"])
                   or (meta.get("le") is not None and not v <= meta["le"]) or (meta.get("lt") is not None and not v < meta["lt"]))
            if bad:
                raise UsageError(f"{flag} must be {_bounds_text(meta)}, got {v}")
        if meta.get("choices") and not meta.get("multiple") and isinstance(value, str):
            if value not in meta["choices"]:
                raise UsageError(f"{flag} must be one of {', '.join(meta['choices'])}, got '{value}'")


def resume_fields(cfg_or_cls) -> list[str]:
    """The fields a resumed run must share with the checkpoint's (marked `resume=True`)."""
    return [f.name for f in dataclasses.fields(cfg_or_cls) if f.metadata.get("resume")]


def defaults(cfg_or_cls) -> dict:
    """Each option's default by its flat name (flat_fields; options without a plain default are left out):
    what a saved configuration that predates an option had for it."""
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    return {name: f.default for name, f, _, _ in flat_fields(cls) if f.default is not dataclasses.MISSING}


class Checked:
    """Mixin: a config is range-checked when it is built, wherever it is built (CLI, scripts, tests)."""

    def __post_init__(self):
        check(self)

    @classmethod
    def of(cls, **flat):
        """Build from flat option names, as the CLI passes them: `ExportConfig.of(model=M, formats=["onnx"],
        output=O, max_seq_length=128, int8_reduce_range=True)`."""
        return from_flat(cls, flat)


@dataclass
class DataConfig(Checked):
    """Where the examples come from: a GLUE task (local glue_data folder or the hub), or the user's own files."""

    task: str = opt(None, "GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) or 'custom'.", resume=True)
    data_dir: str | None = opt(None, "Local glue_data folder. Default: $THESEUS_DATA_DIR, else ../shared/data/glue if it exists, else the hub.",
                               resume=True)
    train_file: str | None = opt(None, "--task custom: training file (.csv, .tsv, .json/.jsonl).", resume=True)
    validation_file: str | None = opt(None, "--task custom: validation file (.csv, .tsv, .json/.jsonl).", resume=True)
    text_columns: str | None = opt(None, "--task custom: one or two text columns, comma-separated (a or a,b).", resume=True)
    label_column: str | None = opt(None, "--task custom: the label column.", resume=True)
    problem_type: str = opt("auto", "--task custom: classification, regression, or auto (inferred from the labels).",
                            choices=["auto", "classification", "regression"], resume=True)
    positive_label: str | None = opt(None, "--task custom with two labels: the label F1 scores as positive (default: the "
                                           "second label in sorted order, e.g. 1 of 0/1). GLUE tasks declare theirs.",
                                     resume=True)
    max_seq_length: int = opt(128, "Truncate inputs to this many tokens.", resume=True, ge=1)
    max_train_samples: int | None = opt(None, "Use only the first N training examples (quick runs).", resume=True, ge=1)
    max_eval_samples: int | None = opt(None, "Use only the first N evaluation examples (quick runs).", resume=True, ge=1)


@dataclass
class TrainConfig(DataConfig):
    """Shared by finetune and compress."""

    model: str = opt(None, "Model: a local folder or a hub id.", resume=True)
    output: str = opt(None, "Output folder (a plain Hugging Face model folder).")
    epochs: float | None = opt(None, "Training epochs. Default: scaled with the data set (see README).", resume=True, gt=0)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).", resume=True, ge=1)
    lr: float | None = opt(None, "Peak learning rate (AdamW, linear warm-up then decay).", resume=True, gt=0)
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and LayerNorm weights unless --decay-norm-and-bias).",
                              resume=True, ge=0)
    decay_norm_and_bias: bool = opt(False, "Also decay biases and LayerNorm weights (the reference BERT recipe excludes them).",
                                    resume=True)
    max_grad_norm: float = opt(1.0, "Clip the gradient's global L2 norm to this (0: no clipping; reference BERT: 1.0).",
                               resume=True, ge=0)
    warmup_ratio: float = opt(0.06, "Fraction of steps for linear warm-up.", resume=True, ge=0, lt=1)
    batch_size: int = opt(32, "Training batch size (per device).", resume=True, ge=1)
    eval_batch_size: int = opt(64, "Evaluation batch size.", ge=1, artifact=True)  # sweep: scores, export profile
    eval_steps: int | None = opt(None, "Evaluate on dev every N steps (default: once per epoch); the best checkpoint is kept.",
                                 resume=True, ge=1)
    save_steps: int | None = opt(None, "Write a resumable checkpoint every N steps (default: same as --eval-steps).",
                                 resume=True, ge=1)
    early_stopping_patience: int | None = opt(None, "Stop after this many evaluations without improvement.", resume=True, ge=1)
    seed: int = opt(42, "Random seed (data order, dropout, replacement draws); a 64-bit integer (torch's seed range).",
                    resume=True, ge=-(2 ** 63), le=2 ** 64 - 1)
    mixed_precision: str = opt("no", "Mixed precision via accelerate.", choices=["no", "fp16", "bf16"], resume=True)
    overwrite: bool = opt(False, "Replace a non-empty output folder.")
    log_steps: int = opt(10, "Log training loss every N steps.", ge=1)
    resume: bool = opt(False, "Continue from the last checkpoint in <output>.partial/ with the same schedule.")
    stop_after_steps: int | None = opt(None, "Stop after this step with a resumable checkpoint in <output>.partial/ "
                                             "and no output yet; continue with --resume (training in time slices, "
                                             "e.g. on preemptible machines).", ge=1)
    group_by_length: bool = opt(False, "Training batches of similar lengths (each shuffled window of 50 batches sorted by "
                                       "length): with per-batch dynamic padding, less padding computed per step.",
                                resume=True)
    # Knowledge distillation (theseus_deploy/distill.py): off by default, so every run without it is unchanged.
    distill_alpha: float = opt(0.0, "Knowledge distillation weight A: loss = (1-A)*task + A*soft, soft = T^2 * "
                                    "KL(softmax(teacher/T) || softmax(student/T)) (regression: MSE of the two predictions) "
                                    "against the teacher's logits on the same batch (compress: the predecessor; finetune: "
                                    "--teacher, default --model before --keep-layers). 0: off.", resume=True, ge=0, le=1)
    distill_temperature: float = opt(1.0, "Temperature T of the soft targets, classification only (needs "
                                          "--distill-alpha > 0; a T other than 1 is refused on a regression task).",
                                     resume=True, gt=0)

    def __post_init__(self):
        super().__post_init__()
        check_distill(self)


def check_distill(cfg) -> None:
    """A distillation setting without distillation is refused, not ignored (compress, finetune, sweep):
    --distill-temperature T without --distill-alpha trained without KD, silently (as --teacher without it is refused)."""
    if cfg.distill_temperature != 1.0 and not cfg.distill_alpha:
        raise UsageError(f"--distill-temperature {cfg.distill_temperature:g} needs --distill-alpha above 0 (without "
                         f"it there is no distillation and the temperature would be ignored)")


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tune a pretrained encoder (or re-fine-tune a classifier) on a task: this gives the predecessor."""

    # Plain fine-tuning learns fast: 3 epochs is the BERT paper's budget, with a floor in steps
    # so that tiny data sets still get enough updates.
    min_steps: int = opt(300, "Default budget: at least this many steps (epochs grow on small data, up to --max-epochs).",
                         resume=True, ge=1)
    max_epochs: int = opt(10, "Cap on the epochs chosen by the default budget.", resume=True, ge=1)
    freeze_layers: int = opt(0, "Freeze embeddings and the bottom N layers (0: train everything).", resume=True, ge=0)
    keep_layers: int | None = opt(None, "Keep only the bottom N layers before training (the truncation baseline).",
                                  resume=True, ge=1)
    teacher: str | None = opt(None, "--distill-alpha: the teacher, a classifier fine-tuned on the task (default: --model "
                                    "as loaded, before --keep-layers truncates it: the vanilla KD baseline).", resume=True)

    def __post_init__(self):
        super().__post_init__()  # TrainConfig: check_distill
        if self.teacher and not self.distill_alpha:
            raise UsageError("--teacher needs --distill-alpha above 0")
        if self.distill_alpha and not self.teacher and self.keep_layers is None:
            raise UsageError("--distill-alpha needs a teacher: --keep-layers N (the teacher is --model before "
                             "truncation) or --teacher MODEL")


@dataclass
class CompressConfig(TrainConfig):
    """Compress a fine-tuned predecessor into a shallower successor with BERT-of-Theseus."""

    successor_layers: int | None = opt(None, "Successor depth n (default: half the predecessor's layers, rounded up).",
                                       resume=True, ge=1)
    init: str = opt("bottom", "Successor initialisation: the predecessor's bottom n layers (paper), top n, or uniformly spaced.",
                    choices=["bottom", "top", "uniform"], resume=True)
    scheduler: str = opt("linear", "Replacement-rate schedule: linear p=min(1,k*t+b); constant p=b then 1; anti (decreasing, ablation).",
                         choices=["linear", "constant", "anti"], resume=True)
    replacing_rate: float = opt(0.3, "b: the replacement probability at step 0 (paper: 0.3).", resume=True, ge=0, le=1)
    steps_to_full: int | None = opt(None, "Steps until p reaches 1 (default: a quarter of the training steps).",
                                    resume=True, ge=1)
    k: float | None = opt(None, "Slope k of the linear schedule (instead of --steps-to-full).", resume=True, gt=0)
    unfreeze_head: bool = opt(True, "Train the pooler/classifier too once p has reached 1 (successor-only phase); "
                                    "--no-unfreeze-head keeps them frozen throughout (the paper).", resume=True)
    unfreeze_embeddings: bool = opt(False, "Train the embeddings too once p has reached 1 (successor-only phase), as "
                                           "--unfreeze-head does the head; off: frozen with the predecessor (the paper). "
                                           "The KD teacher keeps the loaded ones.", resume=True)
    # Both defaults were chosen by the ablation in docs/results.md (MiniLM 6 -> 3, compress's default
    # budget, one seed): p = 1 at a quarter of the steps with the head trained afterwards had the best
    # mean retention, ahead of the paper's p = 1 half-way with a frozen head (CoLA 30.8 vs 26.1 MCC;
    # SST-2 87.2 vs 87.6, within that dev set's noise).
    # With the head frozen, Theseus was slower to converge than fine-tuning (MRPC, MiniLM 6->3: 3
    # epochs stayed at the majority class, 10 epochs learned): a larger floor in steps.
    min_steps: int = opt(1500, "Default budget: at least this many steps (epochs grow on small data, up to --max-epochs).",
                         resume=True, ge=1)
    max_epochs: int = opt(20, "Cap on the epochs chosen by the default budget.", resume=True, ge=1)


@dataclass
class EvaluateConfig(DataConfig):
    """Score a model on a task's dev (or train) split."""

    model: str = opt(None, "Model: a local folder or a hub id.")
    split: str = opt("dev", "Split to score: dev (MNLI: dev = matched), dev_mismatched (MNLI), or train.",
                     choices=["dev", "dev_mismatched", "train"])
    batch_size: int = opt(64, "Evaluation batch size.", ge=1)
    json: bool = opt(False, "Print the metrics as JSON.")
    output: str | None = opt(None, "Also write the metrics JSON to this file.")
    overwrite: bool = opt(False, "Replace an existing --output file.")
    reference: str | None = opt(None, "Also score the loyalty of --model to this model (e.g. the predecessor) on the same "
                                      "rows: label loyalty (same predicted label), probability loyalty (1 - mean base-2 "
                                      "Jensen-Shannon distance); regression: Pearson of the two predictions.")


def _formats():
    return output_names()


def _backends():
    return list(BACKENDS)


@dataclass
class ProfileConfig:
    """The largest shape export builds and validates for, and TensorRT's one optimisation profile."""

    max_batch_size: int = opt(32, "Largest batch (TensorRT profile max).", ge=1)
    max_seq_length: int | None = opt(None, "Longest sequence (TensorRT profile max). Default: 512, or the model's position "
                                           "limit when smaller; a value above that limit is refused.", ge=1)
    opt_batch_size: int | None = opt(None, "TensorRT profile opt batch (default: max/2).", ge=1)
    opt_seq_length: int | None = opt(None, "TensorRT profile opt sequence length (default: max/2).", ge=1)


@dataclass
class Int8Config:
    """INT8 weights (onnx-int8, and the weights of onnx-int8-static)."""

    per_channel: bool = opt(True, "onnx-int8: one weight scale per output channel (more accurate) or per tensor.",
                            flag="--int8-per-channel/--int8-per-tensor", artifact=True)
    reduce_range: bool | None = opt(None, "onnx-int8: 7-bit weights (--int8-reduce-range) or 8-bit "
                                          "(--no-int8-reduce-range). Default: chosen from the CPU, 7-bit on x86 without "
                                          "VNNI/AMX-INT8, where 8-bit u8 x s8 products saturate (theseus_deploy/cpu.py); "
                                          "the choice is recorded in manifest.json.", artifact=True)


@dataclass
class StaticInt8Config:
    """onnx-int8-static: how the calibrated graph is written."""

    format: str = opt("qdq", "onnx-int8-static: QDQ (QuantizeLinear/DequantizeLinear pairs) or QOperator "
                             "(QLinearMatMul) nodes.", choices=["qdq", "qoperator"])
    attention: str = opt("dynamic", "onnx-int8-static: the fused Attention nodes (which ONNX Runtime's static "
                                    "quantiser cannot take): QAttention with its input quantised per call "
                                    "(dynamic) or with a calibrated scale (static), or kept fp32.",
                         choices=["dynamic", "static", "fp32"])


@dataclass
class CalibrationConfig:
    """onnx-int8-static: the texts that calibrate the activation scales."""

    task: str | None = opt(None, "onnx-int8-static: task whose training texts calibrate the activation "
                                 "scales (a GLUE task, or 'custom' with --calibration-file). Default: --task.")
    file: str | None = opt(None, "--calibration-task custom: file of texts (.csv, .tsv, .json/.jsonl).")
    text_columns: str | None = opt(None, "--calibration-task custom: text column(s), a[,b].")
    samples: int = opt(256, "onnx-int8-static: number of calibration texts (the first N).", ge=1)
    seq_length: int | None = opt(None, "onnx-int8-static: calibration texts are padded/truncated to this "
                                       "length (default: min(128, --max-seq-length)).", ge=1)


@dataclass
class TritonConfig:
    """--format triton: the model repository's batching and instances."""

    max_length: int = opt(128, "--format triton: the tokenizer step pads every text to this many tokens.", ge=8)
    max_queue_delay_ms: float = opt(2.0, "--format triton: dynamic batching queue delay (ms).", ge=0, le=10000)
    max_queue_size: int = opt(256, "--format triton: bounded queue; beyond it requests are rejected.", ge=1)
    queue_timeout_ms: float = opt(10000.0, "--format triton: a request queued longer is rejected (ms).", gt=0)
    instances: int = opt(1, "--format triton: instances per model.", ge=1, le=64)


@dataclass
class ExportConfig(Checked):
    """Export a model to ONNX / ONNX Runtime INT8 / FP16 / TensorRT, each validated against PyTorch."""

    model: str = opt(None, "Model folder (predecessor or successor) or hub id.")
    formats: tuple[str, ...] = opt((), "Artifact to build; repeat for several (see the formats below).", choices=_formats(),
                                   flag="--format", multiple=True)
    output: str = opt(None, "Output folder: one file per format, manifest.json, config and tokenizer.")
    opset: int = opt(17, "ONNX opset (17 or higher).", ge=17, artifact=True)
    profile: ProfileConfig = group(ProfileConfig)
    validate: bool = opt(True, "Check every artifact against PyTorch.")
    atol: float | None = opt(None, "Absolute tolerance on logits (default per format: fp32 1e-4, fp16 2e-2, "
                                   "int8/bf16 50% of the largest logit).", gt=0, artifact=True)
    task: str | None = opt(None, "Also score each artifact on this task's dev set next to PyTorch.")
    data_dir: str | None = opt(None, "Local glue_data folder for --task.")
    max_eval_samples: int | None = opt(None, "Score only the first N dev examples.", ge=1)
    max_task_drop: float = opt(0.01, "With --task: fail if an artifact's dev score is more than this below PyTorch's "
                                     "(0.01 = 1 point).", ge=0, le=1)
    min_loyalty: float = opt(0.0, "With --task: fail if an artifact's label loyalty to PyTorch (the share of dev rows "
                                  "where both predict the same label; regression: the Pearson correlation of the two "
                                  "predictions) is below this. Always recorded in the manifest; 0: no limit.", ge=0, le=1)
    int8: Int8Config = group(Int8Config, "int8_")
    allow_unfused: bool = opt(False, "Keep a BERT/RoBERTa graph whose attention ONNX Runtime did not fuse (onnxruntime "
                                     "< 1.31 with transformers 5): it runs, but slower. Default: fail with an error.")
    calibration: CalibrationConfig = group(CalibrationConfig, "calibration_")
    int8_static: StaticInt8Config = group(StaticInt8Config, "int8_static_")
    threads: int | None = opt(None, "CPU threads for validation runs.", ge=1)
    overwrite: bool = opt(False, "Replace a non-empty output folder.")
    triton: TritonConfig = group(TritonConfig, "triton_")


@dataclass
class TrafficConfig:
    """bench --task: real traffic, the whole dev set in batches."""

    batch_size: int = opt(32, "Real traffic: batch size.", ge=1)
    max_length: int = opt(128, "Fixed-padding length (and truncation).", ge=1)
    rounds: int = opt(3, "Real traffic: interleaved rounds (the median is reported), after an untimed pass "
                         "over every distinct batch shape.", ge=1)


@dataclass
class BenchCalibrationConfig:
    """bench --backend onnx-int8-static: its calibration texts."""

    task: str | None = opt(None, "onnx-int8-static: task whose training texts calibrate it (default: --task).")
    samples: int = opt(256, "onnx-int8-static: number of calibration texts.", ge=1)


@dataclass
class BenchConfig(Checked):
    """Latency / throughput sweep over batch x sequence, every backend, predecessor vs successor."""

    models: tuple[str, ...] = opt((), "Model folder, export folder or hub id; repeat: the first is the predecessor, the "
                                      "others are compared with it. An export folder is timed as it is (its own "
                                      "artifacts); a config-only folder (e.g. a bert-base-uncased config) gets random "
                                      "weights.", flag="--model", multiple=True)
    layers: tuple[int, ...] = opt((), "Random-init depth for the models (one value, or one per --model).", multiple=True, ge=1)
    backends: tuple[str, ...] = opt((), "Backend(s) to time; repeat for several. Default: torch (an export folder: "
                                        "every backend its manifest holds).", choices=_backends(),
                                    flag="--backend", multiple=True)
    device: str = opt("cpu", "Device to run on.", choices=["cpu", "cuda"])
    batch_sizes: str = opt("1,8,32", "Comma-separated batch sizes.")
    seq_lens: str = opt("32,128,384", "Comma-separated sequence lengths.")
    warmup: int = opt(3, "Warm-up calls per runner and shape.", ge=0)
    iterations: int = opt(10, "At least this many timed calls per cell.", ge=1)
    min_seconds: float = opt(0.5, "And at least this many seconds per cell.", ge=0)
    rounds: int = opt(5, "Interleaved rounds per shape (paired ratios).", ge=1)
    threads: int | None = opt(None, "CPU threads (torch and ONNX Runtime); recorded.", ge=1)
    output: str = opt(None, "Folder for results.json, results.csv, report.md and plots.")
    check: str | None = opt(None, "Baseline JSON: fail (exit 1) if a speedup ratio regressed beyond --tolerance, "
                                  "judged on its paired rounds (sign test, alpha 0.05; needs --rounds 5 or more).")
    tolerance: float = opt(0.1, "Allowed relative drop of a ratio.", ge=0, lt=1)
    update_baseline: str | None = opt(None, "Write this run's ratios as a baseline JSON here.")
    task: str | None = opt(None, "Real traffic: time the whole dev set of this task.")
    data_dir: str | None = opt(None, "Local glue_data folder for --task.")
    train_file: str | None = opt(None, "--task custom: training file (defines the label set).")
    validation_file: str | None = opt(None, "--task custom: the file whose texts are timed.")
    text_columns: str | None = opt(None, "--task custom: text column(s), a[,b].")
    label_column: str | None = opt(None, "--task custom: label column.")
    max_eval_samples: int | None = opt(None, "Real traffic: only the first N dev examples.", ge=1)
    traffic: TrafficConfig = group(TrafficConfig, "traffic_")
    seq_bucket: int = opt(32, "torch-compile*: pad sequences to a multiple of this (batches to a power of two), "
                              "so that the number of compiled graphs is bounded.", ge=1)
    calibration: BenchCalibrationConfig = group(BenchCalibrationConfig, "calibration_")
    ort_session: str = opt("default", "ONNX Runtime CPU session options: default, or latency (intra-op threads = physical "
                                      "cores, inter-op 1, spinning, sequential; docs/bench.md 'CPU batch 1').",
                           choices=["default", "latency"])
    overwrite: bool = opt(False, "Replace a non-empty output folder.")


@dataclass
class ServeConfig(Checked):
    """Serve a text classifier on Triton (PyTriton's bundled server): KServe v2 HTTP + gRPC, dynamic batching."""

    model: str = opt(None, "Model folder (exported on the fly for ONNX backends) or a folder written by `export`.")
    backend: str = opt("onnx-int8", "Runtime backend of the served model (onnx-int8: the fastest on CPUs; "
                                    "naive baseline: torch with --max-batch-size 1).", choices=_backends())
    device: str = opt("cpu", "Device the model runs on.", choices=["cpu", "cuda"])
    host: str = opt("127.0.0.1", "IPv4 address HTTP, gRPC and metrics listen on (loopback unless --allow-remote).")
    allow_remote: bool = opt(False, "Allow a --host other than loopback (put the server behind your own gateway).")
    http_port: int = opt(8000, "KServe v2 HTTP port.", ge=1, le=65535)
    grpc_port: int = opt(8001, "KServe v2 gRPC port.", ge=1, le=65535)
    metrics_port: int = opt(8002, "Prometheus metrics port.", ge=1, le=65535)
    http_gateway: bool = opt(True, "A thin HTTP front that answers malformed requests with 400 (Triton itself answers "
                                   "some with 500); Triton's HTTP then listens on an internal loopback port.")
    max_batch_size: int = opt(32, "Largest batch the dynamic batcher forms (1: no batching, one request per forward).",
                              ge=1)
    max_queue_delay_ms: float = opt(2.0, "How long the batcher may hold a request to fill a batch (ms).", ge=0, le=10000)
    max_queue_size: int = opt(256, "Requests that may wait in the queue; beyond it requests are rejected at once.", ge=1)
    queue_timeout_ms: float = opt(10000.0, "A request still queued after this long is rejected (ms).", gt=0)
    instances: int = opt(1, "Model instances (each with its own runner and cores/instances threads).", ge=1, le=64)
    threads: int | None = opt(None, "CPU threads per instance (default: cores / instances).", ge=1)
    max_length: int = opt(128, "Truncate texts to this many tokens.", ge=8)
    micro_batch: int = opt(4, "Run a merged batch sorted by length in forwards of at most this many texts, each "
                              "padded to its own longest (0: one forward per merged batch; measured on MiniLM-L6 INT8, c=16: "
                              "4 served 1.35x the requests/s of 0, see docs/serve.md).", ge=0)
    exit_timeout_secs: int = opt(5, "On stop, wait at most this long for in-flight requests (s).", ge=0, le=600)
    verbose: bool = opt(False, "Log the server's and the batcher's messages.")


@dataclass
class LoadtestConfig(Checked):
    """Closed-loop load on served models (loopback only): real dev texts, requests/s and latency per concurrency."""

    urls: tuple[str, ...] = opt((), "Server URL(s), e.g. http://127.0.0.1:8000; several are loaded in turn, interleaved, "
                                    "the first is the reference for ratios.", multiple=True)
    names: tuple[str, ...] = opt((), "A name per URL for the report (default: host:port).", flag="--name", multiple=True)
    model_name: str = opt("text_classifier", "Triton model name on every server.")
    task: str = opt("sst2", "Real texts: this task's dev set (single-sentence tasks).")
    data_dir: str | None = opt(None, "Local glue_data folder.")
    max_eval_samples: int | None = opt(None, "Only the first N dev texts.", ge=1)
    concurrency: str = opt("1,4,16,64", "Comma-separated numbers of concurrent clients (closed loop).")
    requests: int = opt(2000, "Stop a level after this many requests ...", ge=1)
    seconds: float = opt(20.0, "... or after this many seconds, whichever comes first.", gt=0, le=3600)
    warmup: int = opt(16, "Untimed requests per server and level first.", ge=0)
    rounds: int = opt(1, "Interleaved rounds over the servers (medians of paired ratios).", ge=1)
    timeout: float = opt(30.0, "Per-request timeout (s); a timeout counts as an error.", gt=0)
    output: str = opt(None, "Folder for results.json, report.md and latency_vs_throughput.png.")
    overwrite: bool = opt(False, "Replace a non-empty output folder.")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Defaults that apply when the user gave none (recorded in the resolved config).
DEFAULT_LR = {"finetune": 2e-5, "compress": 1e-4}


# ---------------------------------------------------------------------------- sweep
def _compose(cls, skip=(), only=None, defaults=None) -> list[tuple]:
    """(name, type, field) for `make_dataclass`: another command's options reused as they are
    (help, bounds, choices), so `sweep --max-steps` means what `compress --max-steps` means."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        if f.name in (defaults or {}) or f.default_factory is dataclasses.MISSING:
            made = field(default=(defaults or {}).get(f.name, f.default), metadata=f.metadata)
        else:  # a group: a fresh default per instance
            made = field(default_factory=f.default_factory, metadata=f.metadata)
        out.append((f.name, hints[f.name], made))
    return out


@dataclass
class _SweepOwn(Checked):
    model: str = opt(None, "The fine-tuned predecessor (a model folder or hub id); always a candidate itself.",
                     resume=True)
    output: str = opt(None, "Sweep folder DIR: one sub-folder per stage; re-running with the same DIR reuses "
                            "finished stages; sweep.json, sweep.csv, report.md, pareto.png and best/.")
    depths: str | None = opt(None, "Comma-separated depths, the predecessor's own included (default: the predecessor, "
                                   "2/3, 1/2 and 1/3 of its layers, e.g. 6,4,3,2).")
    backends: str = opt("torch,onnx,onnx-int8", "Comma-separated backends (see the list below).")
    device: str = opt("cpu", "Device for timing (and training, through accelerate).", choices=["cpu", "cuda"])
    latency_shape: str = opt("1x128", "Time requests of this batch x sequence shape.")
    traffic: bool = opt(False, "Time real traffic instead: single dev-set requests, each padded to its own length.")
    traffic_samples: int | None = opt(256, "--traffic: this many dev sentences per round.", ge=1)
    latency_budget: str | None = opt(None, "Latency budget for the choice, with a unit: 5ms, 0.005s, 500us.")
    percentile: str = opt("p99", "Latency percentile compared with the budget.", choices=["p50", "p90", "p99"])
    max_task_drop: float = opt(0.01, "Largest allowed drop of the dev score below the predecessor's (0.01 = 1 point); "
                                     "each export is also checked against its own PyTorch model with it.", ge=0, le=1)
    min_loyalty: float = opt(0.0, "Smallest allowed label loyalty to the predecessor (the share of dev rows where a "
                                  "point predicts the predecessor's label; regression: the Pearson correlation of the "
                                  "two predictions), a limit beside --max-task-drop; 0: no limit.", ge=0, le=1)
    warmup: int = opt(10, "Warm-up calls per runner before timing.", ge=0)
    iterations: int = opt(200, "--latency-shape: at least this many timed calls per point (over all rounds).", ge=1)
    min_seconds: float = opt(1.0, "--latency-shape: and at least this many seconds per point.", ge=0)
    rounds: int = opt(5, "Interleaved rounds (paired ratios against the predecessor).", ge=1)
    threads: int | None = opt(None, "CPU threads for training, scoring and timing (torch and ONNX Runtime); recorded.", ge=1)
    overwrite: bool = opt(False, "Start over: discard the finished stages in DIR.")


class _SweepChecked(Checked):
    """The sweep's own cross-option checks (its compress options reach CompressConfig only at a compress stage)."""

    def __post_init__(self):
        super().__post_init__()
        check_distill(self)


# The sweep's default per-depth budget is one epoch at sequence length 64, not compress's default
# (>= 3 epochs, >= 1500 steps): 4 depths x 3 epochs of SST-2 would take most of a day on 2 CPU cores.
SWEEP_COMPRESS_DEFAULTS = {"epochs": 1.0, "max_seq_length": 64}
# min_steps / max_epochs only shape compress's default budget, which the sweep's explicit --epochs replaces.
SWEEP_COMPRESS_SKIP = ("model", "output", "successor_layers", "resume", "overwrite", "min_steps", "max_epochs")
SWEEP_EXPORT_FIELDS = ("opset", "atol", "int8")

SweepConfig = dataclasses.make_dataclass(
    "SweepConfig",
    _compose(_SweepOwn) + _compose(ExportConfig, only=SWEEP_EXPORT_FIELDS)
    + _compose(CompressConfig, skip=SWEEP_COMPRESS_SKIP, defaults=SWEEP_COMPRESS_DEFAULTS),
    bases=(_SweepChecked,))
SweepConfig.__doc__ = ("Compress to several depths, export to several backends, time them, and pick the most accurate "
                       "point within a latency budget. Compress/export options are those of `compress` and `export`.")
SweepConfig.__module__ = __name__
