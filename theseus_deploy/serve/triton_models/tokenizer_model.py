"""Triton Python-backend model: text -> input_ids, attention_mask[, token_type_ids], padded to a fixed length.

Written by `theseus-deploy export --format triton`. Fixed length because Triton's dynamic batcher
merges only requests whose inputs have equal shapes. Needs the `tokenizers` package in the
server's Python (pip install tokenizers). An empty or non-UTF-8 text fails only its own request
(INVALID_ARG: HTTP 400), the other requests of the batch are answered.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


def _error(msg):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "tokenizer_step.json")) as f:
            self.spec = json.load(f)
        self.tok = Tokenizer.from_file(os.path.join(here, "tokenizer.json"))
        length = self.spec["max_length"]
        self.tok.enable_truncation(max_length=length)
        self.tok.enable_padding(length=length, pad_id=self.spec["pad_id"], pad_token=self.spec["pad_token"])

    def execute(self, requests):
        responses = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            try:
                decoded = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
            except UnicodeDecodeError:
                responses.append(pb_utils.InferenceResponse(error=_error("text is not valid UTF-8")))
                continue
            if any(not t.strip() for t in decoded):
                responses.append(pb_utils.InferenceResponse(error=_error("empty text")))
                continue
            enc = self.tok.encode_batch(decoded)
            feeds = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                     "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                     "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(n, feeds[n]) for n in self.spec["input_names"]]))
        return responses
