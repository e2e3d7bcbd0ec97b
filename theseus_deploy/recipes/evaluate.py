"""`evaluate`: score a model folder on a task's split, optionally with its loyalty to a reference.

Under a launcher each rank scores its share of the batches (common.predict) and rank 0 reports:
the rows, the batches and the logits are those of one process.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import config as C
from .. import dist
from ..data import encode, label_mapping, load_from_config, make_loader, positive_id, spec_from_model
from ..errors import UsageError
from ..hf import check_fine_tuned, check_max_seq_length, check_tokenizer_fits, load_classifier, load_config, load_tokenizer, model_input_names
from ..io import check_output_file, dumps, write_json
from ..loyalty import describe, loyalty, to_data_order
from ..metrics import compute_metrics
from .common import predict, print_table, protected_inputs


@dist.locks_output("cfg.output", protected=protected_inputs)
def run_evaluate(cfg: C.EvaluateConfig) -> dict:
    # setup: everything that can be refused before a model is scored
    st = dist.state()
    if cfg.output is not None:
        check_output_file(cfg.output, cfg.overwrite, protected=protected_inputs(cfg))
    model_config = load_config(cfg.model)
    # A bare encoder would load with a new random head: its "score" would be that noise's.
    check_fine_tuned(cfg.model, model_config, "--model", "evaluate scores a model's own predictions, give a model "
                     "fine-tuned on the task (theseus-deploy finetune gives one)")
    check_max_seq_length(model_config, cfg.max_seq_length)
    if cfg.reference:  # a mistyped reference fails before any scoring
        ref_config = load_config(cfg.reference)
        check_fine_tuned(cfg.reference, ref_config, "--reference", "loyalty is measured against a model's own "
                         "predictions, give a model fine-tuned on the task")
        check_max_seq_length(ref_config, cfg.max_seq_length)
        check_tokenizer_fits(cfg.reference, ref_config, load_tokenizer(cfg.reference))
    spec = spec_from_model(cfg, model_config)
    data = load_from_config(cfg, "train" if cfg.split == "train" else cfg.split, spec=spec)
    if cfg.reference:  # a reference of another label set (or task type) fails before --model is scored
        reference_mapping(cfg, data)

    # model and data
    model = load_classifier(cfg.model).eval()
    if st.num_processes > 1:
        model.to(st.device)
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizer_fits(cfg.model, model.config, tokenizer)
    mapping = label_mapping(data.spec, model.config)
    enc = encode(tokenizer, data, cfg.max_seq_length, model_input_names(model), mapping)

    # score
    t0 = time.time()
    logits, labels = predict(model, make_loader(tokenizer, enc, cfg.batch_size, False))
    metrics = compute_metrics(data.spec, logits, labels, positive_id(data.spec, mapping))
    result = {"model": cfg.model, "task": data.spec.name, "split": cfg.split, "num_examples": len(data),
              "num_layers": model.config.num_hidden_layers, "metrics": metrics,
              "seconds": round(time.time() - t0, 3), "data_source": data.source, "num_processes": st.num_processes}
    if cfg.reference:  # every rank: predict() deals the reference's batches too
        result.update(reference_loyalty(cfg, data, to_data_order(logits, mapping), st))

    # report
    if not st.is_main_process:
        return result
    if cfg.output is not None:  # the file holds its resolved configuration too, as every output does
        write_json(cfg.output, {**result, "run_config": {**C.to_dict(cfg), "command": "evaluate"}})
    if cfg.json:
        print(dumps(result, indent=2))
    else:
        rows = [(f"{Path(cfg.model).name} ({result['num_layers']} layers)", metrics)]
        if cfg.reference:
            rows.append((f"{Path(cfg.reference).name} ({result['reference_num_layers']} layers)", result["reference_metrics"]))
        print_table(rows, data.spec.metrics)
        if cfg.reference:
            print(f"loyalty to {cfg.reference}: {describe(result['loyalty'])}")
    return result


def reference_loyalty(cfg, data, logits, st) -> dict:
    """evaluate --reference: the reference model on the same rows (its own tokenizer and label
    ids), and the loyalty of --model to it; `logits` are --model's, in the data's label order."""
    ref_config = load_config(cfg.reference)
    check_max_seq_length(ref_config, cfg.max_seq_length)
    ref = load_classifier(cfg.reference).eval()
    if st.num_processes > 1:
        ref.to(st.device)
    tokenizer = load_tokenizer(cfg.reference)
    mapping = reference_mapping(cfg, data, ref.config)
    enc = encode(tokenizer, data, cfg.max_seq_length, model_input_names(ref), mapping)
    ref_logits, labels = predict(ref, make_loader(tokenizer, enc, cfg.batch_size, False))
    return {"reference": cfg.reference, "reference_num_layers": ref.config.num_hidden_layers,
            "reference_metrics": compute_metrics(data.spec, ref_logits, labels, positive_id(data.spec, mapping)),
            "loyalty": loyalty(logits, to_data_order(ref_logits, mapping), data.spec.is_regression)}


def reference_mapping(cfg, data, ref_config=None):
    """The reference's label ids for the data's labels (data.label_mapping), its errors naming --reference."""
    try:
        return label_mapping(data.spec, ref_config if ref_config is not None else load_config(cfg.reference))
    except UsageError as e:
        raise UsageError(f"--reference {cfg.reference}: {e}") from None
