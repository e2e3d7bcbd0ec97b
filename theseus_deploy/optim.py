"""The optimizer recipe shared by finetune and compress: one function each for the optimizer and
its learning-rate schedule.

As in the reference BERT / BERT-of-Theseus code: AdamW, no weight decay on biases and LayerNorm
weights (here: every parameter with fewer than 2 dimensions, which on BERT is exactly the
reference's `["bias", "LayerNorm.weight"]` list, and also covers other encoders' norm names),
linear warm-up then linear decay, gradient clipping at a global norm of 1.0 (done in the loop).

`late` parameters (compress --unfreeze-head: pooler and classifier) are in the optimizer and
trainable from the start, so the set of trainable tensors never changes after
`accelerate.prepare` (DDP registers its all-reduce hooks at wrapping time) and optimizer and
scheduler state dicts round-trip on --resume. Their learning rate is 0 until `late_start`, and
the loop drops their gradients before that step (so AdamW's moments also start there).
"""
from __future__ import annotations

import torch

GROUPS = ("decay", "no_decay", "late_decay", "late_no_decay")  # fixed order: state dicts line up across runs


def param_groups(model: torch.nn.Module, weight_decay: float, *, decay_norm_and_bias: bool = False,
                 late=()) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of `model` (each group named)."""
    late_ids = {id(p) for p in late}
    groups: dict[str, list] = {name: [] for name in GROUPS}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = decay_norm_and_bias or p.dim() >= 2
        groups[("late_" if id(p) in late_ids else "") + ("decay" if decay else "no_decay")].append(p)
    return [{"params": ps, "weight_decay": weight_decay if not name.endswith("no_decay") else 0.0, "name": name}
            for name, ps in groups.items() if ps]


def configure_optimizers(model: torch.nn.Module, lr: float, weight_decay: float, *,
                         decay_norm_and_bias: bool = False, late=()) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, decay_norm_and_bias=decay_norm_and_bias, late=late)
    if not groups:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr)


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """transformers' get_linear_schedule_with_warmup, as a plain function of the step."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def lr_schedule(optimizer, warmup_steps: int, total_steps: int, late_start: int | None = None):
    """LambdaLR: every group follows the linear schedule; `late_*` groups are at 0 before `late_start`.
    The lambdas are plain functions of the step (not saved in the state dict, rebuilt identically)."""

    def main(step):
        return linear_warmup_decay(step, warmup_steps, total_steps)

    def late(step):
        return main(step) if late_start is not None and step >= late_start else 0.0

    lambdas = [late if g.get("name", "").startswith("late_") else main for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def late_parameters(optimizer) -> list:
    return [p for g in optimizer.param_groups if g.get("name", "").startswith("late_") for p in g["params"]]
