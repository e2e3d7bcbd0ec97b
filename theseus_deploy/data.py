"""Task data: the GLUE tasks (official glue_data TSV folders or the hub) and the user's own files.

`load_task` returns texts and integer (or float, for regression) labels; tokenisation and
batching happen in `make_loader`. Every user mistake raises `UsageError` with one line.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .io import DATA_DIR_ENV


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dir_name: str = ""                       # folder inside glue_data
    columns: tuple = ()                      # TSV text columns (names, or indices if no header)
    label_column: str | int = "label"       # TSV label column
    raw_labels: tuple = ()                   # TSV label values, in label-id order
    label_names: tuple = ()                  # id2label names (the hub's ClassLabel names)
    metrics: tuple = ("accuracy",)           # averaged into "score"
    hub_columns: tuple = ()
    header: bool = True
    dev_file: str = "dev.tsv"
    positive: str | None = None              # the label name F1 counts as positive (two-label tasks)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", "CoLA", (3,), 1, ("0", "1"), ("unacceptable", "acceptable"), ("matthews",),
                     ("sentence",), header=False),
    "sst2": TaskSpec("sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("negative", "positive"), ("accuracy",),
                     ("sentence",)),
    "mrpc": TaskSpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"),
                     ("not_equivalent", "equivalent"), ("f1", "accuracy"), ("sentence1", "sentence2"),
                     positive="equivalent"),
    "stsb": TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), "score", (), (), ("pearson", "spearman"),
                     ("sentence1", "sentence2")),
    "qqp": TaskSpec("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"),
                    ("not_duplicate", "duplicate"), ("f1", "accuracy"), ("question1", "question2"),
                    positive="duplicate"),
    "mnli": TaskSpec("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"),
                     ("accuracy",), ("premise", "hypothesis"), dev_file="dev_matched.tsv"),
    "qnli": TaskSpec("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"),
                     ("entailment", "not_entailment"), ("accuracy",), ("question", "sentence")),
    "rte": TaskSpec("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
                    ("entailment", "not_entailment"), ("accuracy",), ("sentence1", "sentence2")),
    "wnli": TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), "label", ("0", "1"),
                     ("not_entailment", "entailment"), ("accuracy",), ("sentence1", "sentence2")),
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}
TASK_NAMES = tuple(GLUE_TASKS) + ("custom",)


@dataclass
class TaskData:
    spec: TaskSpec
    split: str
    texts: list            # [(text_a, text_b or None)]
    labels: np.ndarray     # int64 label ids, or float32 scores for regression
    source: str = ""       # where it was read from

    @property
    def label_names(self):
        return list(self.spec.label_names)

    def __len__(self):
        return len(self.texts)


def get_spec(task: str) -> TaskSpec:
    if not task:
        raise UsageError("no task given: pass --task (one of " + ", ".join(TASK_NAMES) + ")")
    key = ALIASES.get(task.lower(), task.lower())
    if key not in GLUE_TASKS:
        raise UsageError(f"unknown task '{task}': choose one of " + ", ".join(TASK_NAMES))
    return GLUE_TASKS[key]


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """--data-dir, else $THESEUS_DATA_DIR, else None (hub). The command line also looks for a
    workspace's glue folder (theseus_deploy/cli.py: `workspace_data_dir`); the library guesses nothing."""
    if data_dir:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise UsageError(f"data folder does not exist: {data_dir}")
        return p
    env = os.environ.get(DATA_DIR_ENV)  # io protects the same folder from outputs
    if env:
        if not Path(env).is_dir():
            raise UsageError(f"{DATA_DIR_ENV} does not exist: {env}")
        return Path(env)
    return None


# ---------------------------------------------------------------------------- GLUE, local TSV
# QQP's official train.tsv has a few rows cut short; the reference processors skip them there. Any
# other task's row without its label is an error (a damaged file would otherwise be scored in part).
SKIP_SHORT_ROWS = ("qqp",)


def _read_tsv(path: Path, spec: TaskSpec):
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise UsageError(f"no examples in {path} (empty file)")
    if spec.header:
        header, rows = rows[0], rows[1:]
        try:
            cols = [header.index(c) for c in spec.columns]
            lab = header.index(spec.label_column)
        except ValueError as e:
            raise UsageError(f"{path}: expected column missing ({e}); header is {header}") from None
    else:
        cols, lab = list(spec.columns), spec.label_column
    texts, labels = [], []
    need = max(cols + [lab])
    short = [i for i, r in enumerate(rows) if len(r) <= need]
    if short and spec.name not in SKIP_SHORT_ROWS:
        first = short[0] + 1 + int(spec.header)
        raise UsageError(f"{path}: {len(short)} of {len(rows)} rows have no label column (first at line {first})")
    for r in rows:
        if len(r) <= need:
            continue
        texts.append((r[cols[0]], r[cols[1]] if len(cols) > 1 else None))
        labels.append(r[lab])
    return texts, labels


def _load_glue_local(spec: TaskSpec, root: Path, split: str):
    folder = root / spec.dir_name
    if not folder.is_dir():
        raise UsageError(f"task folder {spec.dir_name}/ not found in {root}")
    fname = {"train": "train.tsv", "dev": spec.dev_file, "dev_mismatched": "dev_mismatched.tsv"}[split]
    path = folder / fname
    if not path.is_file():
        raise UsageError(f"missing data file: {path}")
    texts, raw = _read_tsv(path, spec)
    if spec.is_regression:
        bad = [x for x in raw if not _is_number(x) or not np.isfinite(float(x))]
        if bad:
            raise UsageError(f"{path}: {len(bad)} labels are not finite numbers (e.g. {bad[0]!r})")
        labels = np.asarray([float(x) for x in raw], dtype=np.float32)
    else:
        index = {v: i for i, v in enumerate(spec.raw_labels)}
        bad = sorted({x for x in raw if x not in index})
        if bad:
            raise UsageError(f"{path}: unexpected labels {bad[:5]} (expected {list(spec.raw_labels)})")
        labels = np.asarray([index[x] for x in raw], dtype=np.int64)
    return texts, labels, str(path)


def _load_glue_hub(spec: TaskSpec, split: str):
    try:
        import datasets
    except ImportError:
        raise UsageError("no local GLUE folder found and `datasets` is not installed: pass --data-dir") from None
    hub_split = {"train": "train", "dev": "validation_matched" if spec.name == "mnli" else "validation",
                 "dev_mismatched": "validation_mismatched"}[split]
    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.name, split=hub_split)
    except Exception as e:  # network, missing config ...: one line for the user
        raise UsageError(f"could not load GLUE/{spec.name} from the hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass --data-dir with a local glue_data folder") from None
    a = ds[spec.hub_columns[0]]
    b = ds[spec.hub_columns[1]] if len(spec.hub_columns) > 1 else [None] * len(a)
    dtype = np.float32 if spec.is_regression else np.int64
    return list(zip(a, b)), np.asarray(ds["label"], dtype=dtype), f"hub:nyu-mll/glue/{spec.name}/{hub_split}"


# ---------------------------------------------------------------------------- custom files
def _read_table(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"data file does not exist: {path}")
    suffix = p.suffix.lower()
    try:
        if suffix in (".json", ".jsonl"):
            text = p.read_text(encoding="utf-8-sig").strip()
            if text.startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix in (".csv", ".tsv"):
            with open(p, encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        else:
            raise UsageError(f"unsupported data file type '{suffix}' (use .csv, .tsv, .json or .jsonl): {path}")
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise UsageError(f"could not parse {path}: {str(e).splitlines()[0][:200]}") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise UsageError(f"could not parse {path}: JSON nested too deeply") from None
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"no examples in {path}" if not rows else f"{path}: expected a list of records")
    if not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"{path}: every record must be an object with named columns")
    for i, r in enumerate(rows):
        if None in r:  # csv.DictReader's key for fields beyond the header
            raise UsageError(f"{path}: record {i + 1} has more fields than the header ({len(r) - 1} columns); "
                             "quote fields that contain the delimiter")
    return rows


def _columns(row: dict) -> str:
    return ", ".join(str(k) for k in row)


def label_key(value, path: str = "", where: str = "") -> str:
    """The class a raw label names. Numbers are one class however they are spelt (`1`, `1.0`, ` 1`
    and JSON 1 are class "1"); other strings are stripped of surrounding spaces; all-boolean JSON
    labels are classes "false"/"true". Refused: empty, NaN/inf, non-scalar (UsageError)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)) or value is None:
        raise UsageError(f"{path}: {where} label {value!r} is not a class name or a number")
    text = str(value).strip()
    if not text:
        raise UsageError(f"{path}: {where} has an empty label")
    if _is_number(text):
        f = float(text)
        if not np.isfinite(f):
            raise UsageError(f"{path}: {where} label {text!r} is not a finite number")
        return str(int(f)) if f == int(f) else repr(f)
    return text


def _label_keys(values, path: str) -> list[str]:
    keys = [label_key(v, path, f"record {i + 1}") for i, v in enumerate(values)]
    bools = [isinstance(v, bool) for v in values]
    if any(bools) and not all(bools):
        i = bools.index(not bools[0])
        raise UsageError(f"{path}: labels mix booleans and other values (record {i + 1}: {values[i]!r}): "
                         "use one kind (0/1, true/false or names)")
    return keys


def _is_number(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def custom_spec(train_file: str | None, text_columns: str | None, label_column: str | None,
                problem_type: str = "auto", label_names: list[str] | None = None,
                positive_label: str | None = None) -> TaskSpec:
    """Build a TaskSpec from the training file (label set, classification vs regression)."""
    if not text_columns or not label_column:
        raise UsageError("--task custom needs --text-columns and --label-column")
    cols = tuple(c.strip() for c in text_columns.split(",") if c.strip())
    if not 1 <= len(cols) <= 2:
        raise UsageError(f"--text-columns takes one or two column names, got '{text_columns}'")
    if label_names is None:
        if not train_file:
            raise UsageError("--task custom needs --train-file (it defines the label set)")
        rows = _read_table(train_file)
        if label_column not in rows[0]:
            raise UsageError(f"label column '{label_column}' not in {train_file} (columns: {_columns(rows[0])})")
        values = [r.get(label_column) for r in rows]
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise UsageError(f"{train_file}: record {missing[0] + 1} has no value for column {label_column} "
                             f"({len(missing)} of {len(values)} records)")
        keys = _label_keys(values, train_file)
        numeric = all(_is_number(k) for k in keys) and not any(isinstance(v, bool) for v in values)
        if problem_type == "auto":
            problem_type = "regression" if numeric and any(float(k) != int(float(k)) for k in keys) else "classification"
        if problem_type == "regression":
            if not numeric:
                bad = next(v for v, k in zip(values, keys) if not _is_number(k) or isinstance(v, bool))
                raise UsageError(f"{train_file}: regression labels must be finite numbers, got {bad!r}")
            label_names = []
        else:
            uniq = set(keys)
            label_names = sorted(uniq, key=lambda v: (float(v), v) if numeric else (0, v))
    metrics = ("pearson", "spearman") if not label_names else (("f1", "accuracy") if len(label_names) == 2 else ("accuracy",))
    positive = None
    if len(label_names) == 2:
        positive = label_names[1] if positive_label is None else label_key(positive_label, "--positive-label", "its")
        if positive not in label_names:
            raise UsageError(f"--positive-label '{positive_label}' is not one of the labels ({', '.join(label_names)})")
    elif positive_label is not None:
        raise UsageError(f"--positive-label needs a task with two labels, this one has {len(label_names) or 'none (regression)'}")
    return TaskSpec("custom", "", cols, label_column, tuple(label_names), tuple(label_names), metrics, positive=positive)


def _load_custom(spec: TaskSpec, path: str):
    rows = _read_table(path)
    for c in spec.columns + (spec.label_column,):
        if c not in rows[0]:
            raise UsageError(f"column '{c}' not in {path} (columns: {_columns(rows[0])})")
    for i, r in enumerate(rows):  # JSON lines may differ per record; a short CSV row gives None
        gaps = [c for c in spec.columns + (spec.label_column,) if r.get(c) is None]
        if gaps:
            raise UsageError(f"{path}: record {i + 1} has no value for column(s) {', '.join(gaps)}")
        odd = [c for c in spec.columns if isinstance(r[c], (dict, list, bool))]
        if odd:
            raise UsageError(f"{path}: record {i + 1}: column {odd[0]} holds {type(r[odd[0]]).__name__}, not text")
    texts = [(str(r[spec.columns[0]]), str(r[spec.columns[1]]) if len(spec.columns) > 1 else None) for r in rows]
    raw = [r[spec.label_column] for r in rows]
    if spec.is_regression:
        bad = [v for v in raw if isinstance(v, bool) or not _is_number(v) or not np.isfinite(float(v))]
        if bad:
            raise UsageError(f"{path}: regression labels must be finite numbers, got {bad[0]!r}")
        return texts, np.asarray([float(v) for v in raw], dtype=np.float32), path
    keys = _label_keys(raw, path)
    index = {v: i for i, v in enumerate(spec.label_names)}
    bad = sorted({k for k in keys if k not in index})
    if bad:
        raise UsageError(f"{path}: labels {bad[:5]} not among the training labels {list(spec.label_names)}")
    return texts, np.asarray([index[k] for k in keys], dtype=np.int64), path


def load_task(task: str, data_dir: str | None = None, split: str = "dev", max_samples: int | None = None,
              train_file: str | None = None, validation_file: str | None = None, text_columns: str | None = None,
              label_column: str | None = None, problem_type: str = "auto", spec: TaskSpec | None = None,
              positive_label: str | None = None) -> TaskData:
    """Load one split of a GLUE task or of the user's files (`task='custom'`)."""
    if split not in ("train", "dev", "dev_mismatched"):
        raise UsageError(f"unknown split '{split}' (train, dev, dev_mismatched)")
    if task and task.lower() == "custom":
        spec = spec or custom_spec(train_file, text_columns, label_column, problem_type, positive_label=positive_label)
        path = train_file if split == "train" else validation_file
        if not path:
            raise UsageError(f"--task custom needs --{'train' if split == 'train' else 'validation'}-file")
        texts, labels, source = _load_custom(spec, path)
    else:
        if positive_label is not None:
            raise UsageError("--positive-label is for --task custom (GLUE tasks declare theirs: MRPC equivalent, QQP duplicate)")
        spec = get_spec(task)
        if split == "dev_mismatched" and spec.name != "mnli":
            raise UsageError("split dev_mismatched exists only for mnli")
        root = resolve_data_dir(data_dir)
        texts, labels, source = _load_glue_local(spec, root, split) if root else _load_glue_hub(spec, split)
    if max_samples is not None:
        texts, labels = texts[:max_samples], labels[:max_samples]
    if len(texts) == 0:
        raise UsageError(f"no examples in the {split} split of {source}")
    return TaskData(spec, split, texts, labels, source)


def check_training_labels(data: TaskData) -> None:
    """Refuse training data that cannot teach a classifier anything: one class only, or constant scores."""
    labels = np.asarray(data.labels)
    if len(labels) and (labels == labels.flat[0]).all():
        what = (f"label {data.spec.label_names[int(labels.flat[0])]!r}" if not data.spec.is_regression
                else f"score {float(labels.flat[0]):g}")
        raise UsageError(f"all {len(labels)} training examples of {data.source} have {what}: "
                         "nothing to learn (use more or other training data)")


def spec_from_model(cfg, model_config) -> TaskSpec | None:
    """`--task custom` without --train-file (evaluate): the label set comes from the model."""
    if (cfg.task or "").lower() != "custom" or cfg.train_file:
        return None
    n = model_config.num_labels
    if n == 1 or model_config.problem_type == "regression":
        names = []
    else:
        id2label = {int(k): str(v) for k, v in (model_config.id2label or {}).items()}
        names = [id2label.get(i, str(i)) for i in range(n)]
        if all(v == f"LABEL_{i}" for i, v in enumerate(names)):
            names = [str(i) for i in range(n)]  # generic names: the data's labels are the ids
    return custom_spec(None, cfg.text_columns, cfg.label_column, cfg.problem_type, label_names=names,
                       positive_label=cfg.positive_label)


def load_from_config(cfg, split: str, spec: TaskSpec | None = None) -> TaskData:
    """load_task with the data fields of a DataConfig."""
    max_samples = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    return load_task(cfg.task, cfg.data_dir, split, max_samples, cfg.train_file, cfg.validation_file,
                     cfg.text_columns, cfg.label_column, cfg.problem_type, spec=spec, positive_label=cfg.positive_label)


# ---------------------------------------------------------------------------- labels vs model
def label_mapping(data_spec: TaskSpec, model_config) -> np.ndarray | None:
    """Map data label ids to the model's label ids; None means identity.

    A model fine-tuned by us carries the task's names in id2label; a model from elsewhere may
    carry generic LABEL_i names, which we take positionally when the count matches.
    """
    n_model = model_config.num_labels
    if data_spec.is_regression:
        if n_model != 1:
            raise UsageError(f"task {data_spec.name} is a regression task but the model has {n_model} labels")
        return None
    names = list(data_spec.label_names)
    if n_model != len(names):
        raise UsageError(f"the model has {n_model} labels but task {data_spec.name} has {len(names)} ({', '.join(names)})")
    label2id = {str(k): int(v) for k, v in (model_config.label2id or {}).items()}
    for table, key in ((label2id, str), ({k.lower(): v for k, v in label2id.items()}, str.lower)):
        # exact names first, then case-insensitive (a hub model's NEGATIVE/POSITIVE vs negative/positive)
        if all(key(n) in table for n in names) and len({key(n) for n in names}) == len(names):
            mapping = np.asarray([table[key(n)] for n in names], dtype=np.int64)
            return None if (mapping == np.arange(len(names))).all() else mapping
    if all(k.startswith("LABEL_") for k in label2id) or not label2id:
        return None
    missing = [n for n in names if n.lower() not in {k.lower() for k in label2id}]
    raise UsageError(f"labels the model does not have: {', '.join(missing)} (model labels: {', '.join(label2id)})")


def positive_id(data_spec: TaskSpec, mapping) -> int | None:
    """The model's label id of the task's positive class (what F1 scores), after `label_mapping`:
    MRPC's positive class is `equivalent` whichever id a model gives it."""
    if data_spec.positive is None:
        return None
    i = list(data_spec.label_names).index(data_spec.positive)
    return int(mapping[i]) if mapping is not None else i


# ---------------------------------------------------------------------------- tokenise + batch
@dataclass
class Encoded:
    features: list = field(default_factory=list)   # dicts of token lists, one per example
    labels: np.ndarray | None = None


def encode(tokenizer, data: TaskData, max_seq_length: int, input_names: list[str], mapping=None) -> Encoded:
    a = [t[0] for t in data.texts]
    b = [t[1] for t in data.texts] if data.texts[0][1] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_seq_length)
    keys = [k for k in input_names if k in enc]
    feats = [{k: enc[k][i] for k in keys} for i in range(len(a))]
    labels = data.labels if mapping is None else mapping[data.labels]
    return Encoded(feats, labels)


class _Dataset:
    def __init__(self, encoded: Encoded):
        self.e = encoded

    def __len__(self):
        return len(self.e.features)

    def __getitem__(self, i):
        item = dict(self.e.features[i])
        item["labels"] = self.e.labels[i].item()
        return item


def length_grouped_batches(order: list[int], lengths: list[int], batch_size: int, window: int = 50) -> list[list[int]]:
    """Batches of similar lengths from a shuffled `order`: each run of `window` batches' worth of
    examples is sorted by length (longest first) and cut into batches, as transformers'
    `group_by_length` does. Every example still appears once per epoch and the grouping follows the
    shuffle, so it changes with (seed, epoch) and is the same for a resumed run; with dynamic
    padding a batch then pads to a length close to its examples' own."""
    mega = batch_size * window
    out = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i:i + mega], key=lambda j: -lengths[j])  # stable: ties keep the shuffle
        out += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return out


def make_loader(tokenizer, encoded: Encoded, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                skip_batches: int = 0, group_by_length: bool = False):
    """Dynamic padding per batch (each batch pads to its own longest example, never to
    --max-seq-length). The shuffle order depends only on (seed, epoch), and a resumed run skips
    the batches it already trained on, so it sees exactly the batches an uninterrupted run would
    have seen. `group_by_length` (training): batches of similar lengths (`length_grouped_batches`)."""
    import torch
    from torch.utils.data import DataLoader

    def collate(items):
        labels = torch.tensor([it.pop("labels") for it in items])
        batch = tokenizer.pad(items, return_tensors="pt")
        batch["labels"] = labels
        return dict(batch)

    n = len(encoded.features)
    order = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1000 + epoch) % 2 ** 64)) if shuffle else torch.arange(n)
    if group_by_length:
        lengths = [len(f["input_ids"]) for f in encoded.features]
        batches = length_grouped_batches(order.tolist(), lengths, batch_size)[skip_batches:]
    else:
        batches = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)][skip_batches:]
    # A private generator: creating a loader iterator must not consume the global RNG (dropout),
    # or a resumed run would draw different dropout masks.
    return DataLoader(_Dataset(encoded), batch_sampler=batches, collate_fn=collate, generator=torch.Generator())
