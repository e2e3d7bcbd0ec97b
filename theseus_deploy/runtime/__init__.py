"""Running a model: one runner per backend, shared by `export` validation, `bench`, `sweep`, `serve` and users.

    from theseus_deploy.runtime import TextClassifier, load_runner
    runner = load_runner("runs/succ", "torch-bf16")            # a model folder
    runner = load_runner("exports/succ", "onnx-int8")           # a folder written by `export`
    clf = TextClassifier.load("exports/succ", backend="onnx-int8")
    clf(["a great movie", "a dull movie"])  -> [{"label": "positive", "score": 0.97}, ...]

base (Runner, random_inputs, check_device) <- pytorch, ort, trt <- loader (load_runner) <- classifier.
Imports point one way: runtime -> artifact -> core (registry, hf, io, errors); never to a command.
onnxruntime, tensorrt and torch are imported inside the functions that need them.
"""
from .base import Runner, check_device, random_inputs
from .classifier import TextClassifier
from .loader import load_runner, precheck, torch_runner
from .ort import ORT_SESSION_CONFIGS, OrtRunner, check_ort_provider, ort_session_options, physical_cores
from .pytorch import CompiledRunner, TorchRunner, check_compiler, cpu_has_bf16
from .trt import TrtRunner, check_trt_available

__all__ = ["Runner", "check_device", "random_inputs", "TextClassifier", "load_runner", "precheck", "torch_runner",
           "ORT_SESSION_CONFIGS", "OrtRunner", "check_ort_provider", "ort_session_options", "physical_cores",
           "CompiledRunner", "TorchRunner", "check_compiler", "cpu_has_bf16", "TrtRunner", "check_trt_available"]
