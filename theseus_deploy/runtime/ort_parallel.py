"""`onnx-parallel`: ONNX Runtime with its parallel executor, the backend added to show the registry's
promise (docs/design.md): one `Backend` entry in theseus_deploy/registry.py plus this runner, and
`export`, `bench`, `sweep`, `serve` and `TextClassifier.load` take it with no other file changed.

ONNX Runtime's sequential executor runs one node at a time (each node itself multi-threaded with the
intra-op pool); `ExecutionMode.ORT_PARALLEL` runs independent nodes at once on an inter-op pool. A
BERT encoder is mostly a chain of nodes, so the parallel executor is expected to help little: the
backend is a measured comparison point (`bench --backend onnx --backend onnx-parallel`), not a
default, and nothing here claims a speed-up.
"""
from __future__ import annotations

from .ort import OrtRunner, ort_session_options


class OrtParallelRunner(OrtRunner):
    """The fused graph of an export folder on ONNX Runtime's parallel executor."""

    @staticmethod
    def session_options(config: str, threads: int | None, options: dict):
        opts = ort_session_options(config, threads, graph_optimization=options.get("graph_optimization", "all"),
                                   execution_mode="parallel")
        opts.inter_op_num_threads = int(options.get("inter_op_threads", 2))
        return opts
