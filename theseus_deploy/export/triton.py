"""`theseus-deploy export --format triton`: a Triton model repository, validated offline (the
`triton` writer of theseus_deploy/registry.py, beside the formats).

    REPO/
      text_classifier/              ensemble: text -> label, score (what clients call)
      text_classifier_tokenizer/    Python backend: text -> ids, padded to a fixed length
      text_classifier_onnx/         onnxruntime_onnx, INT8 (or fp32) graph, CPU instances
      text_classifier_postprocess/  Python backend: logits -> label, score
      text_classifier_gpu/          ensemble over the GPU classifier, where a GPU artifact was built:
      text_classifier_onnx_fp16/    onnxruntime_onnx fp16 with the TensorRT accelerator (GPU instances)
      text_classifier_trt/          tensorrt_plan (GPU instances)
      manifest.json, README.md      what was packaged (the export manifest inside) and a model card
      run_config.json               the resolved `export` configuration

The tokenizer pads to one fixed length because Triton's dynamic batcher merges only requests of
equal shape. Input and output names are those of `theseus-deploy serve` (text -> label, score),
so one client talks to both. PyTriton's bundled server has no onnxruntime/TensorRT backend (a
model declared onnxruntime_onnx stays UNAVAILABLE there): the repository is for the full Triton
server (NGC container, docs/serve.md). It is checked offline after it is written: every
config.pbtxt parsed with Triton's model_config protobuf (tritonclient), each ONNX model's
inputs/outputs compared with its graph, and every ensemble step wired to tensors that exist.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from theseus_deploy import config as C
from theseus_deploy.artifact import ExportFolder, is_export_folder
from theseus_deploy.deps import require
from theseus_deploy.errors import UsageError
from theseus_deploy.hf import load_config, load_tokenizer
from theseus_deploy.io import atomic_output_dir, check_output_dir, write_json
from theseus_deploy.loyalty import describe
from theseus_deploy.registry import WRITERS

from .api import export_inputs, export_model

NAME = "text_classifier"
ONNX_DTYPES = {1: "TYPE_FP32", 6: "TYPE_INT32", 7: "TYPE_INT64", 10: "TYPE_FP16", 9: "TYPE_BOOL"}
HERE = Path(__file__).resolve().parents[1] / "serve"  # triton_models/: the Python-backend steps live with serve
# export format -> (model suffix, platform, file in the version folder, device kind)
CLASSIFIERS = {"onnx-int8": ("onnx", "onnxruntime_onnx", "model.onnx", "KIND_CPU"),
               "onnx": ("onnx", "onnxruntime_onnx", "model.onnx", "KIND_CPU"),
               "onnx-fp16": ("onnx_fp16", "onnxruntime_onnx", "model.onnx", "KIND_GPU"),
               "trt": ("trt", "tensorrt_plan", "model.plan", "KIND_GPU")}


class RepositoryError(UsageError):
    """The written repository does not hold together (a config that does not parse or does not match)."""


def _tensor(name, dtype, dims):
    return {"name": name, "data_type": dtype, "dims": list(dims)}


def _batching(max_batch_size, delay_ms, queue_size, timeout_ms):
    preferred = sorted({b for b in (max_batch_size // 4, max_batch_size // 2, max_batch_size) if b >= 2})
    out = {"max_queue_delay_microseconds": int(delay_ms * 1000),
           "default_queue_policy": {"timeout_action": "REJECT", "default_timeout_microseconds": int(timeout_ms * 1000),
                                    "allow_timeout_override": True, "max_queue_size": queue_size}}
    if preferred:
        out["preferred_batch_size"] = preferred
    return out


def to_pbtxt(config: dict) -> str:
    """A config dict -> protobuf text, through Triton's own ModelConfig message (unknown fields fail here)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    msg = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    return text_format.MessageToString(msg)


def model_configs(manifest: dict, artifacts: list[str], num_labels: int, max_batch_size: int, max_length: int,
                  delay_ms: float, queue_size: int, timeout_ms: float, instances: int) -> dict[str, dict]:
    """Every model's config (dicts in ModelConfig's JSON form), keyed by model name."""
    names = manifest["input_names"]
    ids = [_tensor(n, "TYPE_INT64", [-1]) for n in names]
    batching = _batching(max_batch_size, delay_ms, queue_size, timeout_ms)
    cfgs = {
        f"{NAME}_tokenizer": {"name": f"{NAME}_tokenizer", "backend": "python", "max_batch_size": max_batch_size,
                              "input": [_tensor("text", "TYPE_STRING", [1])],
                              "output": [_tensor(n, "TYPE_INT64", [max_length]) for n in names],
                              "dynamic_batching": batching, "instance_group": [{"count": instances, "kind": "KIND_CPU"}]},
        f"{NAME}_postprocess": {"name": f"{NAME}_postprocess", "backend": "python", "max_batch_size": max_batch_size,
                                "input": [_tensor("logits", "TYPE_FP32", [num_labels])],
                                "output": [_tensor("label", "TYPE_STRING", [1]), _tensor("score", "TYPE_FP32", [1])],
                                "dynamic_batching": batching, "instance_group": [{"count": instances, "kind": "KIND_CPU"}]},
    }
    for fmt in artifacts:
        suffix, platform, _, kind = CLASSIFIERS[fmt]
        name = f"{NAME}_{suffix}"
        cfg = {"name": name, "platform": platform, "max_batch_size": max_batch_size, "input": ids,
               "output": [_tensor("logits", "TYPE_FP32", [num_labels])], "dynamic_batching": batching,
               "instance_group": [{"count": instances, "kind": kind}]}
        if fmt == "onnx-fp16":
            cfg["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
                {"name": "tensorrt", "parameters": {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30)}}]}}
        cfgs[name] = cfg
    for ens, kinds in ((NAME, ("KIND_CPU",)), (f"{NAME}_gpu", ("KIND_GPU",))):
        clf = next((f"{NAME}_{CLASSIFIERS[f][0]}" for f in artifacts if CLASSIFIERS[f][3] in kinds), None)
        if clf is None:
            continue
        cfgs[ens] = {"name": ens, "platform": "ensemble", "max_batch_size": max_batch_size,
                     "input": [_tensor("text", "TYPE_STRING", [1])],
                     "output": [_tensor("label", "TYPE_STRING", [1]), _tensor("score", "TYPE_FP32", [1])],
                     "ensemble_scheduling": {"step": [
                         {"model_name": f"{NAME}_tokenizer", "model_version": -1, "input_map": {"text": "text"},
                          "output_map": {n: f"_{n}" for n in names}},
                         {"model_name": clf, "model_version": -1, "input_map": {n: f"_{n}" for n in names},
                          "output_map": {"logits": "_logits"}},
                         {"model_name": f"{NAME}_postprocess", "model_version": -1, "input_map": {"logits": "_logits"},
                          "output_map": {"label": "label", "score": "score"}}]}}
    return cfgs


def export_repository(cfg) -> dict:
    """The `triton` writer (theseus_deploy/registry.py): write a Triton model repository from a model
    folder (exported first: the config's other formats, default onnx-int8) or from an export folder
    (its artifacts), then validate it offline. `cfg`: the ExportConfig (`cfg.triton`: batching)."""
    t = cfg.triton
    model, output, overwrite, max_batch_size = cfg.model, cfg.output, cfg.overwrite, cfg.profile.max_batch_size
    max_length, max_queue_delay_ms, max_queue_size = t.max_length, t.max_queue_delay_ms, t.max_queue_size
    queue_timeout_ms, instances = t.queue_timeout_ms, t.instances
    src = Path(model)
    formats = [f for f in cfg.formats if f not in WRITERS]
    unknown = [f for f in formats if f not in CLASSIFIERS]
    if unknown:
        raise UsageError(f"--format triton packages {', '.join(CLASSIFIERS)}; not {', '.join(unknown)}")
    if not src.is_dir() or not (src / "config.json").is_file():
        raise UsageError(f"{model} is not a model folder or an export folder (no config.json)")
    if max_length < 8:
        raise UsageError(f"--triton-max-length must be at least 8, got {max_length}")
    protected = export_inputs(cfg)
    check_output_dir(output, overwrite, protected=protected)  # never the source model, even with --overwrite

    require("export --format triton", "tritonclient.grpc.model_config_pb2")  # before any work

    with atomic_output_dir(output, overwrite, protected=protected) as tmp:
        # At the repository root, beside manifest.json: Triton loads models from the sub-folders only.
        write_json(tmp / "run_config.json", {**C.to_dict(cfg), "command": "export"})
        if is_export_folder(src):
            export_dir = src
        else:
            export_dir = tmp / ".export"
            export_model(dataclasses.replace(cfg, formats=tuple(formats or WRITERS["triton"].default_formats),
                                             output=str(export_dir), overwrite=False))
        folder = ExportFolder.read(export_dir)
        manifest = folder.manifest
        have = {a.format: a for a in folder.artifacts if a.file}
        wanted = formats or list(have)
        artifacts = [f for f in CLASSIFIERS if f in wanted and f in have]
        if "onnx-int8" in artifacts and "onnx" in artifacts:
            artifacts.remove("onnx")  # one CPU classifier: INT8 is the fast one
        if not any(CLASSIFIERS[f][3] == "KIND_CPU" for f in artifacts) and not artifacts:
            raise UsageError(f"{model}: no artifact Triton can serve ({', '.join(CLASSIFIERS)}); found {', '.join(have) or 'none'}")
        profile = manifest.get("profile") or {}
        if profile.get("max"):
            if "trt" in artifacts and max_batch_size > profile["max"][0]:
                raise UsageError(f"--max-batch-size {max_batch_size} exceeds the TensorRT engine's profile ({profile['max'][0]})")
            if max_length > profile["max"][1]:
                raise UsageError(f"--triton-max-length {max_length} exceeds the export's profile ({profile['max'][1]})")
        config = load_config(str(export_dir))
        num_labels = int(config.num_labels)
        cfgs = model_configs(manifest, artifacts, num_labels, max_batch_size, max_length, max_queue_delay_ms,
                             max_queue_size, queue_timeout_ms, instances)
        for name, cfg in cfgs.items():
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(to_pbtxt(cfg))
        for fmt in artifacts:
            suffix, platform, file, _ = CLASSIFIERS[fmt]
            path = folder.resolve(fmt)  # listed, confined, hashed
            # a user's export folder: a file that is not what its format says is named, before it is copied
            # (one exported just now was validated by export_model; validate_repository parses the copies)
            if platform == "onnxruntime_onnx" and export_dir == src:
                _load_onnx(path, f"{path}: not an ONNX graph for {fmt}")
            shutil.copy(path, tmp / f"{NAME}_{suffix}" / "1" / file)
        tok_dir = tmp / f"{NAME}_tokenizer" / "1"
        tokenizer = load_tokenizer(str(export_dir))
        if (export_dir / "tokenizer.json").is_file():
            shutil.copy(export_dir / "tokenizer.json", tok_dir / "tokenizer.json")
        else:
            tokenizer.backend_tokenizer.save(str(tok_dir / "tokenizer.json"))
        shutil.copy(HERE / "triton_models" / "tokenizer_model.py", tok_dir / "model.py")
        (tok_dir / "tokenizer_step.json").write_text(json.dumps(
            {"max_length": max_length, "pad_id": tokenizer.pad_token_id, "pad_token": tokenizer.pad_token,
             "input_names": manifest["input_names"]}, indent=2) + "\n")
        post = tmp / f"{NAME}_postprocess" / "1"
        shutil.copy(HERE / "triton_models" / "postprocess_model.py", post / "model.py")
        (post / "labels.json").write_text(json.dumps({str(k): v for k, v in config.id2label.items()}, indent=2) + "\n")
        checks = validate_repository(tmp)
        repo = {"models": sorted(cfgs), "entry_points": [n for n in (NAME, f"{NAME}_gpu") if n in cfgs],
                "classifiers": {f: f"{NAME}_{CLASSIFIERS[f][0]}" for f in artifacts}, "max_batch_size": max_batch_size,
                "max_length": max_length, "max_queue_delay_ms": max_queue_delay_ms, "max_queue_size": max_queue_size,
                "queue_timeout_ms": queue_timeout_ms, "instances": instances, "validation": checks,
                "export_manifest": manifest}
        write_json(tmp / "manifest.json", repo)
        (tmp / "README.md").write_text(model_card(repo, config))
        if export_dir.parent == tmp:
            shutil.rmtree(export_dir)
    return repo


def validate_repository(repo: str | Path) -> list[str]:
    """Parse every config.pbtxt with Triton's ModelConfig and check it against the files beside it;
    RepositoryError listing every problem, else the list of checks that passed."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = Path(repo)
    DT = model_config_pb2.DataType
    problems, done, models = [], [], {}
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        try:
            models[cfg_path.parent.name] = text_format.Parse(cfg_path.read_text(), model_config_pb2.ModelConfig())
        except text_format.ParseError as e:
            problems.append(f"{cfg_path.relative_to(repo)}: does not parse as a Triton ModelConfig: {e}")
    if not models and not problems:
        problems.append(f"{repo}: no */config.pbtxt")
    for folder, m in models.items():
        where = f"{folder}/config.pbtxt"
        if m.name and m.name != folder:
            problems.append(f"{where}: name '{m.name}' differs from its folder '{folder}'")
        if m.max_batch_size < 1:
            problems.append(f"{where}: max_batch_size must be >= 1 for batching, got {m.max_batch_size}")
        if m.HasField("dynamic_batching"):
            db = m.dynamic_batching
            if any(p > m.max_batch_size for p in db.preferred_batch_size):
                problems.append(f"{where}: preferred_batch_size {list(db.preferred_batch_size)} above max_batch_size {m.max_batch_size}")
            if db.default_queue_policy.max_queue_size <= 0:
                problems.append(f"{where}: the queue is unbounded (default_queue_policy.max_queue_size)")
        if m.platform == "ensemble":
            _check_ensemble(folder, m, models, problems)
            done.append(f"{folder}: ensemble steps wired to existing models and tensors")
            continue
        version = repo / folder / "1"
        file = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}.get(m.platform) or (
            "model.py" if m.backend == "python" else None)
        if file is None:
            problems.append(f"{where}: unknown platform/backend '{m.platform or m.backend}'")
            continue
        if not (version / file).is_file():
            problems.append(f"{folder}/1/{file}: missing")
            continue
        if m.platform == "onnxruntime_onnx":
            try:
                graph = _load_onnx(version / file, f"{folder}/1/{file}: not an ONNX graph").graph
            except UsageError as e:
                problems.append(str(e))
                continue
            init = {i.name for i in graph.initializer}
            for kind, cfg_list, g_list in (("input", m.input, [i for i in graph.input if i.name not in init]),
                                           ("output", m.output, graph.output)):
                g = {t.name: t for t in g_list}
                c = {t.name: t for t in cfg_list}
                if set(g) != set(c):
                    problems.append(f"{where}: {kind}s {sorted(c)} differ from the ONNX graph's {sorted(g)}")
                    continue
                for name, t in c.items():
                    tt = g[name].type.tensor_type
                    want = ONNX_DTYPES.get(tt.elem_type)
                    if DT.Name(t.data_type) != want:
                        problems.append(f"{where}: {kind} '{name}' is {DT.Name(t.data_type)}, the graph has {want}")
                    rank = len(tt.shape.dim)
                    if rank != len(t.dims) + 1:
                        problems.append(f"{where}: {kind} '{name}' has {len(t.dims)} dims + batch, the graph rank {rank}")
                        continue
                    first = tt.shape.dim[0]
                    if first.HasField("dim_value") and first.dim_value != m.max_batch_size:
                        problems.append(f"{where}: the graph's batch dimension of '{name}' is fixed at {first.dim_value}")
                    for d_cfg, d in zip(t.dims, list(tt.shape.dim)[1:]):
                        if d.HasField("dim_value") and d_cfg not in (-1, d.dim_value):
                            problems.append(f"{where}: {kind} '{name}' dims {list(t.dims)} do not fit the graph")
            done.append(f"{folder}: inputs/outputs match {file}")
        else:
            done.append(f"{folder}: {file} present")
    if problems:  # one line: the CLI's `error:` line
        raise RepositoryError("Triton repository check failed: " + "; ".join(problems))
    return [f"{n}/config.pbtxt parses as ModelConfig" for n in sorted(models)] + done


def _load_onnx(path: Path, what: str):
    """The ONNX model at `path` (weights not loaded); UsageError `what (reason)` when it is not one
    (measured: a truncated file raised protobuf's DecodeError, a JSON file the same)."""
    import onnx

    try:  # protobuf whatever the name (onnx picks its JSON reader for a listed `*.json`, as ONNX Runtime does not)
        model = onnx.load(str(path), format="protobuf", load_external_data=False)
    except Exception as e:  # DecodeError, and whatever else a file that is no ModelProto raises
        raise UsageError(f"{what} ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    if not model.graph.node:
        raise UsageError(f"{what} (no graph nodes)")
    return model


def _check_ensemble(folder, m, models, problems):
    where = f"{folder}/config.pbtxt"
    available = {t.name for t in m.input}
    steps = m.ensemble_scheduling.step
    if not steps:
        problems.append(f"{where}: no ensemble steps")
    for step in steps:
        target = models.get(step.model_name)
        if target is None:
            problems.append(f"{where}: step model '{step.model_name}' is not in the repository")
            continue
        t_in = {t.name for t in target.input}
        t_out = {t.name for t in target.output}
        for model_input, tensor in step.input_map.items():
            if model_input not in t_in:
                problems.append(f"{where}: '{step.model_name}' has no input '{model_input}' (has {sorted(t_in)})")
            if tensor not in available:
                problems.append(f"{where}: tensor '{tensor}' fed to '{step.model_name}' is produced by no earlier step")
        missing = t_in - set(step.input_map)
        if missing:
            problems.append(f"{where}: inputs {sorted(missing)} of '{step.model_name}' are not fed")
        for model_output, tensor in step.output_map.items():
            if model_output not in t_out:
                problems.append(f"{where}: '{step.model_name}' has no output '{model_output}' (has {sorted(t_out)})")
            available.add(tensor)
        if target.max_batch_size < m.max_batch_size:
            problems.append(f"{where}: step '{step.model_name}' max_batch_size {target.max_batch_size} < the ensemble's {m.max_batch_size}")
    for t in m.output:
        if t.name not in available:
            problems.append(f"{where}: output '{t.name}' is produced by no step")


def _loyalty_note(task: dict) -> str:
    return f" (loyalty: {describe(task['loyalty'])})" if task.get("loyalty") else ""


def model_card(repo: dict, config) -> str:
    m = repo["export_manifest"]
    task = m.get("task") or {}
    lines = [f"# {NAME}: {m.get('model_type')} text classifier, {m.get('num_layers')} layers", "",
             f"Source model: `{m.get('source_model')}`. Labels: {', '.join(str(v) for v in config.id2label.values())}.", "",
             "## Serve", "",
             "Full Triton server (NGC container, onnxruntime and python backends; the tokenizer step needs "
             "`pip install tokenizers` in the container):", "",
             "```", "docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 -p 127.0.0.1:8002:8002 \\",
             "  -v $PWD:/models nvcr.io/nvidia/tritonserver:24.10-py3 bash -c \\",
             "  'pip install tokenizers && tritonserver --model-repository=/models --model-control-mode=explicit "
             + " ".join(f"--load-model={n}" for n in [NAME] + [x for x in repo["models"] if x.endswith(("tokenizer", "postprocess", "_onnx"))])
             + "'", "```", "",
             f"Request: POST /v2/models/{NAME}/infer with input `text` (BYTES, shape [n, 1]); outputs `label`, `score`. "
             "GPU instances: load `text_classifier_gpu` and its classifier instead"
             + (" (present)." if f"{NAME}_gpu" in repo["models"] else " (not built: export with --format onnx-fp16 or trt)."), "",
             "## Models", "", "| model | role |", "|---|---|"]
    roles = {NAME: "ensemble (CPU): text -> label, score", f"{NAME}_gpu": "ensemble (GPU)",
             f"{NAME}_tokenizer": f"Python: tokenizer, padded to {repo['max_length']} tokens",
             f"{NAME}_postprocess": "Python: softmax, label"}
    roles.update({v: f"classifier, {k}" for k, v in repo["classifiers"].items()})
    lines += [f"| {n} | {roles.get(n, '')} |" for n in repo["models"]]
    lines += ["", f"Dynamic batching: max batch {repo['max_batch_size']}, queue delay {repo['max_queue_delay_ms']} ms, "
              f"queue of {repo['max_queue_size']} requests (beyond it, or after {repo['queue_timeout_ms']} ms, rejected).", ""]
    if task:
        lines += ["## Scores", "", f"{task.get('name')} dev ({task.get('num_examples')} examples): PyTorch "
                  f"{task['pytorch']['score']:.4f}" + "".join(
                      f"; {a['format']} {a['validation']['task']['score']:.4f}" + _loyalty_note(a['validation']['task'])
                      for a in m["artifacts"]
                      if a.get("validation", {}).get("task")), ""]
    lines += ["## Versions", "", "```", json.dumps(m.get("versions", {}), indent=1), "```", ""]
    return "\n".join(lines)
