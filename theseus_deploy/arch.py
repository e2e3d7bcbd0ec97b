"""One description per encoder architecture: what every command needs to know about a model type.

Knowledge that used to be spread over modeling (layer path), hf (position offset), export.onnx
(ONNX Runtime optimizer type, expected fused ops) and the runners lives here, as optimum keeps one
description per architecture. Standard library only.

    layers          the encoder's layer list, relative to `model.base_model`
    position_offset position ids start after the padding index (RoBERTa family, MPNet): the
                    usable length is max_position_embeddings - pad_token_id - 1
    ort_type        the model type onnxruntime.transformers.optimizer fuses it as
    fused           fused ops `export` must find in the onnx graph: Attention once per layer, the
                    others at least once. Measured with onnxruntime 1.32 and transformers 5.24 on
                    tiny models: BERT fuses one Attention per layer and its embeddings into
                    EmbedLayerNormalization; RoBERTa fuses attention but keeps its embeddings
                    unfused; MPNet's relative position bias keeps attention unfused by design. On
                    onnxruntime 1.30 the BERT export fused 0 Attention and 0
                    EmbedLayerNormalization (1.31 added the mask-path patterns of transformers 5's
                    eager attention). Types not measured are not checked.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    layers: str = "encoder.layer"
    position_offset: bool = False
    ort_type: str = "bert"
    fused: tuple = ()


ARCHS: dict[str, Arch] = {
    "bert": Arch(fused=("Attention", "EmbedLayerNormalization")),
    "roberta": Arch(position_offset=True, fused=("Attention",)),
    "xlm-roberta": Arch(position_offset=True),
    "camembert": Arch(position_offset=True),
    "data2vec-text": Arch(position_offset=True),
    "longformer": Arch(position_offset=True),
    "mpnet": Arch(position_offset=True),
    "electra": Arch(),
    "deberta-v2": Arch(),
    "distilbert": Arch(layers="transformer.layer"),
}
# Where other encoders keep their layers (tried in order for a model type not listed above).
LAYER_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "layers")


def arch(model_type: str | None) -> Arch | None:
    """The description of `model_type`, or None for an architecture we have no entry for."""
    return ARCHS.get(model_type or "")


def max_positions(config) -> int | None:
    """The longest input (in tokens) the model's position table takes, or None if unbounded."""
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        return None
    a = arch(getattr(config, "model_type", None))
    if a is not None and a.position_offset:
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n
