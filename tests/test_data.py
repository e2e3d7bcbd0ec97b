"""GLUE loaders on the real ../shared/data/glue files, custom files, label mapping."""
import json

import numpy as np
import pytest

from theseus_deploy.data import custom_spec, get_spec, label_mapping, load_task, resolve_data_dir
from theseus_deploy.errors import UsageError

# rows as documented in ../shared/README.md
COUNTS = {"sst2": (67349, 872), "mrpc": (3668, 408), "cola": (8551, 1043), "stsb": (5749, 1500), "rte": (2490, 277)}


@pytest.mark.parametrize("task", sorted(COUNTS))
def test_glue_loaders(task, glue_dir):
    train = load_task(task, str(glue_dir), "train")
    dev = load_task(task, str(glue_dir), "dev")
    assert (len(train), len(dev)) == COUNTS[task]
    spec = get_spec(task)
    pair = task != "sst2" and task != "cola"
    assert all((b is not None) == pair for _, b in dev.texts)
    if spec.is_regression:
        assert dev.labels.dtype == np.float32 and 0 <= dev.labels.min() and dev.labels.max() <= 5
    else:
        assert set(np.unique(train.labels)) == set(range(spec.num_labels))


def test_mrpc_bom_and_cola_headerless(glue_dir):
    mrpc = load_task("mrpc", str(glue_dir), "dev")
    assert mrpc.texts[0][0].startswith("He said the foodservice pie business")
    assert mrpc.labels[0] == 1
    cola = load_task("cola", str(glue_dir), "dev")
    assert cola.texts[0] == ("The sailors rode the breeze clear of the rocks.", None)
    rte = load_task("rte", str(glue_dir), "dev")
    assert rte.labels[0] == 1  # not_entailment is id 1, as on the hub


def test_max_samples_and_env_override(glue_dir, monkeypatch, tmp_path):
    assert len(load_task("sst2", str(glue_dir), "dev", max_samples=10)) == 10
    monkeypatch.setenv("THESEUS_DATA_DIR", str(glue_dir))
    assert resolve_data_dir(None) == glue_dir
    monkeypatch.setenv("THESEUS_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="THESEUS_DATA_DIR does not exist"):
        resolve_data_dir(None)


def test_unknown_task_and_missing_dir(tmp_path):
    with pytest.raises(UsageError, match="unknown task 'sst3'"):
        load_task("sst3")
    with pytest.raises(UsageError, match="data folder does not exist"):
        load_task("sst2", str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="task folder SST-2/ not found"):
        load_task("sst2", str(tmp_path))


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        sep = "\t" if kind == "tsv" else ","
        keys = list(rows[0])
        path.write_text("\n".join([sep.join(keys)] + [sep.join(str(r[k]) for k in keys) for r in rows]) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_custom_classification(tmp_path, kind):
    rows = [{"text": f"t{i}", "other": f"o{i}", "y": ["neg", "pos"][i % 2]} for i in range(6)]
    f = _write(tmp_path / f"d.{kind}", rows, kind)
    d = load_task("custom", split="train", train_file=f, text_columns="text,other", label_column="y")
    assert d.spec.label_names == ("neg", "pos") and not d.spec.is_regression
    assert d.texts[1] == ("t1", "o1") and d.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert d.spec.metrics == ("f1", "accuracy")


def test_custom_regression_inferred(tmp_path):
    rows = [{"a": "x", "score": v} for v in (0.5, 1.25, 3.0)]
    f = _write(tmp_path / "r.csv", rows, "csv")
    d = load_task("custom", split="dev", train_file=f, validation_file=f, text_columns="a", label_column="score")
    assert d.spec.is_regression and d.labels.dtype == np.float32
    spec = custom_spec(f, "a", "score", "classification")
    assert spec.label_names == ("0.5", "1.25", "3")  # numbers are one class however spelt: 3.0 is "3"


def test_custom_errors(tmp_path):
    f = _write(tmp_path / "d.csv", [{"text": "a", "y": 1}], "csv")
    with pytest.raises(UsageError, match="column 'txt' not in"):
        load_task("custom", split="train", train_file=f, text_columns="txt", label_column="y")
    with pytest.raises(UsageError, match="label column 'z' not in"):
        load_task("custom", split="train", train_file=f, text_columns="text", label_column="z")
    with pytest.raises(UsageError, match="does not exist"):
        load_task("custom", split="train", train_file=str(tmp_path / "x.csv"), text_columns="text", label_column="y")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(UsageError, match="no examples"):
        load_task("custom", split="train", train_file=str(empty), text_columns="text", label_column="y")
    with pytest.raises(UsageError, match="needs --text-columns"):
        load_task("custom", split="train", train_file=f)
    dev = _write(tmp_path / "dev.csv", [{"text": "a", "y": 7}], "csv")
    with pytest.raises(UsageError, match=r"labels \['7'\] not among"):
        load_task("custom", split="dev", train_file=f, validation_file=dev, text_columns="text", label_column="y")


class _Cfg:
    def __init__(self, num_labels, label2id):
        self.num_labels, self.label2id = num_labels, label2id


def test_label_mapping():
    sst2, stsb, mnli = get_spec("sst2"), get_spec("stsb"), get_spec("mnli")
    assert label_mapping(sst2, _Cfg(2, {"negative": 0, "positive": 1})) is None
    assert label_mapping(sst2, _Cfg(2, {"positive": 0, "negative": 1})).tolist() == [1, 0]
    assert label_mapping(sst2, _Cfg(2, {"LABEL_0": 0, "LABEL_1": 1})) is None
    with pytest.raises(UsageError, match="has 2 labels but task mnli has 3"):
        label_mapping(mnli, _Cfg(2, {}))
    with pytest.raises(UsageError, match="regression task but the model has 2 labels"):
        label_mapping(stsb, _Cfg(2, {}))
    with pytest.raises(UsageError, match="labels the model does not have: negative"):
        label_mapping(sst2, _Cfg(2, {"positive": 0, "neutral": 1}))


@pytest.mark.parametrize("task,cols", [("mnli", ("premise", "hypothesis")), ("qqp", ("question1", "question2")),
                                       ("qnli", ("question", "sentence")), ("sst2", ("sentence",))])
def test_hub_path_maps_columns_and_splits(task, cols, monkeypatch, tmp_path):
    """No hub here: a stand-in for datasets.load_dataset checks names, splits and columns we ask for."""
    datasets = pytest.importorskip("datasets")

    asked = {}

    def fake_load(path, name, split):
        asked.update(path=path, name=name, split=split)
        data = {c: [f"{c} {i}" for i in range(3)] for c in cols}
        data["label"] = [0, 1, 0]
        return datasets.Dataset.from_dict(data)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.delenv("THESEUS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("theseus_deploy.data.resolve_data_dir", lambda d: None)
    d = load_task(task, split="dev")
    assert asked == {"path": "nyu-mll/glue", "name": task, "split": "validation_matched" if task == "mnli" else "validation"}
    assert d.texts[1] == (f"{cols[0]} 1", f"{cols[1]} 1" if len(cols) > 1 else None)
    assert d.labels.tolist() == [0, 1, 0] and d.source.startswith("hub:")


def test_hub_failure_is_one_line(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def boom(*a, **k):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    monkeypatch.setattr("theseus_deploy.data.resolve_data_dir", lambda d: None)
    with pytest.raises(UsageError, match=r"could not load GLUE/rte from the hub \(ConnectionError: no network\); pass --data-dir") as e:
        load_task("rte")
    assert "\n" not in str(e.value)


# Official glue_data headers of the tasks not in ../shared (rows made up, layouts as distributed)
OFFICIAL = {
    ("QQP", "dev.tsv"): ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                         "1\t11\t12\tHow do I learn Python?\tWhat is the best way to learn Python?\t1",
                         "2\t13\t14\tWhy is the sky blue?\tHow tall is Everest?\t0"],
    ("MNLI", "dev_matched.tsv"): [
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
        "0\t1\t1n\tslate\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tThe cat sat.\tA cat sat.\tneutral\tneutral\tneutral\tneutral\tneutral\tneutral",
        "1\t2\t2e\tslate\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tIt rains.\tWater falls.\tentailment\tentailment\tentailment\tentailment\tentailment\tentailment"],
    ("MNLI", "dev_mismatched.tsv"): [
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
        "0\t1\t1c\tletters\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tIt is day.\tIt is night.\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction"],  # noqa: E501
    ("QNLI", "dev.tsv"): ["index\tquestion\tsentence\tlabel",
                          "0\tWhat is red?\tA rose is red.\tentailment",
                          "1\tWho won?\tIt rained all day.\tnot_entailment"],
    ("WNLI", "dev.tsv"): ["index\tsentence1\tsentence2\tlabel",
                          "0\tThe trophy did not fit because it was big.\tThe trophy was big.\t1"],
}


def test_local_tsv_layouts_of_the_other_glue_tasks(tmp_path):
    for (folder, name), lines in OFFICIAL.items():
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text("\n".join(lines) + "\n")
    qqp = load_task("qqp", str(tmp_path), "dev")
    assert qqp.texts[0] == ("How do I learn Python?", "What is the best way to learn Python?")
    assert qqp.labels.tolist() == [1, 0]
    mnli = load_task("mnli", str(tmp_path), "dev")
    assert mnli.texts[1] == ("It rains.", "Water falls.") and mnli.labels.tolist() == [1, 0]  # neutral=1, entailment=0
    mm = load_task("mnli", str(tmp_path), "dev_mismatched")
    assert mm.labels.tolist() == [2] and mm.source.endswith("dev_mismatched.tsv")
    qnli = load_task("qnli", str(tmp_path), "dev")
    assert qnli.texts[0] == ("What is red?", "A rose is red.") and qnli.labels.tolist() == [0, 1]
    wnli = load_task("wnli", str(tmp_path), "dev")
    assert wnli.labels.tolist() == [1] and len(wnli) == 1


def test_empty_glue_file_and_ragged_jsonl(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("")
    with pytest.raises(UsageError, match="no examples in .*dev.tsv"):
        load_task("sst2", str(tmp_path), "dev")
    f = tmp_path / "r.jsonl"
    f.write_text('{"text": "good", "y": 1}\n{"text": "bad"}\n')
    with pytest.raises(UsageError, match="record 2 has no value for column"):
        load_task("custom", split="train", train_file=str(f), text_columns="text", label_column="y")


def test_label_names_match_case_insensitively():
    sst2 = get_spec("sst2")
    assert label_mapping(sst2, _Cfg(2, {"NEGATIVE": 0, "POSITIVE": 1})) is None
    assert label_mapping(sst2, _Cfg(2, {"POSITIVE": 0, "NEGATIVE": 1})).tolist() == [1, 0]


def test_glue_layouts_on_synthetic_fixtures(synthetic_glue):
    """The five tasks' real layouts, in CI without ../shared: headerless CoLA, MRPC's BOM, STS-B floats."""
    from conftest import write_synthetic_glue  # noqa: F401  (the fixture's writer: layouts documented there)

    words = "the a cat dog sat ran on under mat road big small".split()

    def sent(i, n=5):
        return " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(n)).capitalize() + "."

    cola = load_task("cola", str(synthetic_glue), "train")
    assert len(cola) == 8 and cola.texts[0] == (sent(0), None)  # no header row eaten, 4th column
    assert cola.labels.tolist() == [0, 1] * 4 and cola.spec.header is False
    mrpc = load_task("mrpc", str(synthetic_glue), "dev")
    assert len(mrpc) == 4 and mrpc.labels.tolist() == [1, 0, 1, 0]  # BOM before "Quality" did not hide the column
    assert mrpc.texts[0] == (sent(20), '"' + sent(21))                # quotes are text, not CSV quoting
    stsb = load_task("stsb", str(synthetic_glue), "dev")
    assert stsb.labels.dtype == np.float32 and stsb.labels.tolist() == [5.0, 3.75, 2.5, 1.25]
    assert stsb.texts[1] == (sent(31), sent(32))
    rte = load_task("rte", str(synthetic_glue), "train")
    assert rte.labels.tolist() == [0, 1] * 4 and rte.texts[0] == (sent(0, 9), sent(4))
    sst2 = load_task("sst2", str(synthetic_glue), "dev")
    assert sst2.texts[0] == (sent(70).lower()[:-1] + " ", None) and sst2.labels.tolist() == [1, 0, 1, 0]
    for task, n in (("cola", 4), ("mrpc", 8), ("stsb", 8), ("rte", 4), ("sst2", 8)):
        assert len(load_task(task, str(synthetic_glue), "train" if n == 8 else "dev")) == n


def test_positive_label_declared_by_task_and_flag(tmp_path):
    from theseus_deploy.data import positive_id

    mrpc = get_spec("mrpc")
    assert mrpc.positive == "equivalent" and get_spec("qqp").positive == "duplicate"
    # a model that calls `equivalent` id 0: the positive class follows the name, not the id
    mapping = label_mapping(mrpc, _Cfg(2, {"equivalent": 0, "not_equivalent": 1}))
    assert mapping.tolist() == [1, 0] and positive_id(mrpc, mapping) == 0
    assert positive_id(mrpc, None) == 1
    f = _write(tmp_path / "d.csv", [{"text": f"t{i}", "y": ["no", "yes"][i % 2]} for i in range(4)], "csv")
    assert custom_spec(f, "text", "y").positive == "yes"
    assert custom_spec(f, "text", "y", positive_label="no").positive == "no"
    with pytest.raises(UsageError, match="--positive-label 'maybe' is not one of the labels"):
        custom_spec(f, "text", "y", positive_label="maybe")
    with pytest.raises(UsageError, match="--positive-label is for --task custom"):
        load_task("mrpc", str(tmp_path), "dev", positive_label="equivalent")


def test_numeric_labels_are_one_class_however_spelt(tmp_path):
    """`1`, `1.0`, ` 1` (and JSON 1) are one class, not three; all-boolean JSON labels are false/true."""
    f = tmp_path / "t.csv"
    f.write_text("text,y\n" + "".join(f"t{i},{lab}\n" for i, lab in enumerate(["0", "1", "1.0", " 1", "0.0", "0"])))
    d = load_task("custom", split="train", train_file=str(f), text_columns="text", label_column="y")
    assert d.spec.label_names == ("0", "1") and d.labels.tolist() == [0, 1, 1, 1, 0, 0]
    j = tmp_path / "t.jsonl"
    j.write_text("".join(json.dumps({"text": f"t{i}", "y": v}) + "\n" for i, v in enumerate([1, 1.0, 0, "1"])))
    assert custom_spec(str(j), "text", "y").label_names == ("0", "1")
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"text": f"t{i}", "y": v}) + "\n" for i, v in enumerate([True, False, True])))
    assert custom_spec(str(b), "text", "y").label_names == ("false", "true")


@pytest.mark.parametrize("labels, msg", [(["1", "nan", "0"], "not a finite number"), (["1", "inf", "0"], "not a finite"),
                                         (["1", "", "0"], "empty label"), ([True, 1, False], "mix booleans")])
def test_labels_that_name_no_class_are_refused(tmp_path, labels, msg):
    j = tmp_path / "t.jsonl"
    j.write_text("".join(json.dumps({"text": f"t{i}", "y": v}) + "\n" for i, v in enumerate(labels)))
    with pytest.raises(UsageError, match=msg):
        custom_spec(str(j), "text", "y")


def test_the_library_guesses_no_data_folder_the_cli_finds_the_workspace_one(tiny_bert, monkeypatch, tmp_path):
    """README: --data-dir, else $THESEUS_DATA_DIR, else ../shared/data/glue if it exists, else the hub. The
    last default belongs to the command line; `data.resolve_data_dir` itself never looks beside the cwd."""
    import os
    import subprocess
    import sys

    from conftest import REPO, write_synthetic_glue
    from theseus_deploy.cli import workspace_data_dir

    glue = write_synthetic_glue(tmp_path / "shared" / "data" / "glue")
    (tmp_path / "clone").mkdir()
    monkeypatch.chdir(tmp_path / "clone")
    monkeypatch.delenv("THESEUS_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    assert workspace_data_dir() == str(glue)
    env = {k: v for k, v in os.environ.items() if k != "THESEUS_DATA_DIR"}
    r = subprocess.run([sys.executable, "-m", "theseus_deploy", "evaluate", "--model", str(tiny_bert), "--task", "sst2",
                        "--max-seq-length", "16", "--json"], capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["data_source"] == str(glue / "SST-2" / "dev.tsv")


@pytest.mark.parametrize("group", [False, True])
def test_dynamic_padding_and_length_groups_give_the_per_example_logits(group, tmp_path):
    """Batches pad to their own longest example (never to max_seq_length), and --group-by-length
    batches examples of similar lengths: the logits of every row equal those of the row run alone,
    unpadded (within float tolerance), and every row is in exactly one batch per epoch."""
    import random

    import torch

    from theseus_deploy.data import TaskData, encode, make_loader
    from theseus_deploy.hf import load_classifier, load_tokenizer
    from tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m", "bert", 2)
    model, tok = load_classifier(str(model_dir)).eval(), load_tokenizer(str(model_dir))
    rng = random.Random(0)
    words = "the a movie film plot actor scene story music ending time people".split()
    texts = [(" ".join(rng.choices(words, k=rng.randint(1, 40))), None) for _ in range(150)]
    data = TaskData(get_spec("sst2"), "train", texts, np.zeros(len(texts), dtype=np.int64))
    enc = encode(tok, data, 64, ["input_ids", "attention_mask", "token_type_ids"])
    loader = make_loader(tok, enc, 16, True, seed=3, epoch=1, group_by_length=group)
    batches = loader.batch_sampler
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    lengths = [len(f["input_ids"]) for f in enc.features]
    padded = 0
    with torch.no_grad():
        for idx, batch in zip(batches, loader):
            batch.pop("labels")
            assert batch["input_ids"].shape[1] == max(lengths[i] for i in idx)  # its own longest, not 64
            padded += batch["input_ids"].numel()
            got = model(**batch).logits
            for row, i in enumerate(idx):
                alone = {k: torch.tensor([v]) for k, v in enc.features[i].items()}
                torch.testing.assert_close(got[row], model(**alone).logits[0], rtol=1e-4, atol=1e-5)
    if group:  # similar lengths: far less padding than a random order's (same seed and epoch)
        plain = make_loader(tok, enc, 16, True, seed=3, epoch=1).batch_sampler
        assert padded < 0.8 * sum(len(b) * max(lengths[i] for i in b) for b in plain)
        resumed = make_loader(tok, enc, 16, True, seed=3, epoch=1, skip_batches=4, group_by_length=True)
        assert resumed.batch_sampler == batches[4:]  # a resumed run sees the same batches
