"""FLOPs of an encoder classifier forward at a shape, for the ideal depth speedup.

Per layer, with hidden h, intermediate i, sequence s (multiply-add = 2 FLOPs):
  Q, K, V and output projections  4 * 2*s*h*h
  attention scores and context    2 * 2*s*s*h
  feed-forward                    2 * 2*s*h*i
plus the pooler (2*h*h) and classifier (2*h*labels) once. Embedding lookups, layer norms,
softmax and GELU are not matmuls and are left out (a few percent at these shapes).
"""
from __future__ import annotations


def encoder_flops(config, batch_size: int, seq_len: int, num_layers: int | None = None) -> float:
    h = config.hidden_size
    i = getattr(config, "intermediate_size", 4 * h)
    s = seq_len
    layers = num_layers if num_layers is not None else config.num_hidden_layers
    per_layer = 4 * 2 * s * h * h + 2 * 2 * s * s * h + 2 * 2 * s * h * i
    head = 2 * h * h + 2 * h * max(1, getattr(config, "num_labels", 2))
    return float(batch_size * (layers * per_layer + head))


def ideal_speedup(pred_config, succ_config, batch_size: int, seq_len: int) -> float:
    return encoder_flops(pred_config, batch_size, seq_len) / encoder_flops(succ_config, batch_size, seq_len)
