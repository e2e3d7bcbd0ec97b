"""Triton Python-backend model: logits -> label (BYTES) and score (FP32), as TextClassifier returns them.

Written by `theseus-deploy export --format triton`; the labels come from labels.json beside it.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "labels.json")) as f:
            self.id2label = {int(k): v for k, v in json.load(f).items()}

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy().astype(np.float32)
            if logits.shape[-1] == 1:  # regression
                labels = np.array([[b"score"]] * len(logits), dtype=object)
                scores = logits[:, :1]
            else:
                e = np.exp(logits - logits.max(-1, keepdims=True))
                probs = e / e.sum(-1, keepdims=True)
                idx = probs.argmax(-1)
                labels = np.array([[self.id2label.get(int(i), str(int(i))).encode()] for i in idx], dtype=object)
                scores = probs[np.arange(len(idx)), idx].reshape(-1, 1).astype(np.float32)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("label", labels), pb_utils.Tensor("score", scores)]))
        return responses
