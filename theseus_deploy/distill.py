"""Knowledge distillation for `compress` (Theseus + KD) and `finetune --keep-layers` (vanilla KD).

Per training batch the loss is

    loss = (1 - A) * task + A * soft

A = --distill-alpha (0: off, the default; the code path is then exactly the one without KD),
task = the model's own loss on the labels (cross-entropy; MSE for regression), and soft the
soft-target loss against the teacher's logits on the same batch:
- classification: T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean, T =
  --distill-temperature (the T^2 keeps the gradient scale independent of T, Hinton et al. 2015);
- regression: MSE(student prediction, teacher prediction) (T does not apply).

The teacher runs once per step, in eval mode (no dropout: it draws no random numbers, so a
resumed run stays bit-identical) and under `torch.no_grad`:
- `compress`: the predecessor itself, i.e. the Theseus wrapper with every module forced to its
  predecessor block, with the pooler/classifier as they were loaded (with --unfreeze-head the
  head trains in the successor-only phase; the teacher keeps the original one);
- `finetune`: a separate frozen model, `--teacher` or by default `--model` as loaded before
  `--keep-layers` truncated it (the paper's vanilla KD baseline: truncated successor, task +
  soft-target loss, no module replacing).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import label_mapping
from .errors import UsageError
from .hf import check_fine_tuned, check_max_seq_length, check_tokenizer_fits, load_classifier, load_config, load_tokenizer, model_input_names


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, regression: bool) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T) (batch mean) for classification; MSE for regression."""
    student, teacher = student.float(), teacher.float().detach()
    if regression:
        return F.mse_loss(student.reshape(-1), teacher.reshape(-1))
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def combine(task: torch.Tensor, soft: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * task + alpha * soft."""
    return (1.0 - alpha) * task + alpha * soft


def check_for_task(alpha: float, temperature: float, regression: bool) -> None:
    """A temperature on a regression task is refused, not ignored: its soft target is the MSE of the
    two predictions, which no temperature changes (compress, finetune, sweep: where the task is known)."""
    if regression and alpha > 0 and temperature != 1.0:
        raise UsageError(f"--distill-temperature {temperature:g} has no effect on a regression task (its soft "
                         "target is the MSE of the two predictions): leave it at 1")


class Distiller:
    """The soft-target term of one run: `teacher(batch)` gives the teacher's logits in the
    student's label order; `loss(task, student_logits, batch)` the combined loss."""

    def __init__(self, alpha: float, temperature: float, regression: bool, teacher):
        self.alpha, self.temperature, self.regression, self.teacher = alpha, temperature, regression, teacher
        self.last_soft: float | None = None

    def loss(self, task: torch.Tensor, student_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        soft = soft_target_loss(student_logits, self.teacher(batch), self.temperature, self.regression)
        self.last_soft = float(soft.detach())
        return combine(task, soft, self.alpha)


def theseus_teacher(theseus, autocast, embeddings: bool = False):
    """The predecessor path of a Theseus wrapper as a teacher (eval mode, no_grad, original head,
    and with `embeddings` (--unfreeze-embeddings) the original embeddings)."""
    from torch.func import functional_call

    kept = theseus.head_parameters() + (theseus.embedding_parameters() if embeddings else [])
    head_ids = {id(p) for p in kept}
    live = {n: p for n, p in theseus.model.named_parameters() if id(p) in head_ids}
    # The head (--unfreeze-head) and embeddings may learn later: the teacher keeps a copy of the loaded ones.
    head = {n: p.detach().clone() for n, p in live.items()}

    @torch.no_grad()
    def teacher(batch):
        # The copy follows the model: the accelerator moves the wrapper to its device after this
        # teacher is built, and a copy left on the CPU fails against a model on a GPU.
        for n, p in live.items():
            if head[n].device != p.device or head[n].dtype != p.dtype:
                head[n] = head[n].to(device=p.device, dtype=p.dtype)
        was = theseus.training
        theseus.eval()
        theseus.force("predecessor")
        try:
            with autocast():
                out = functional_call(theseus.model, head, args=(), kwargs=batch, strict=False)
        finally:
            theseus.force(None)
            theseus.train(was)
        return out.logits.float()

    return teacher


def load_teacher(name: str, spec, tokenizer, student_mapping, max_seq_length: int,
                 student_inputs: list[str], pairs: bool):
    """A frozen classifier for `finetune --distill-alpha`, checked against the task and the
    student's tokenizer and inputs: (model, column order that puts its logits in the student's
    label order). The teacher reads the student's batches: a teacher that takes token_type_ids the
    student's batches lack (a BERT teacher, a DistilBERT student) is refused on a text-pair task,
    where it would see every token as the first text's; on a single-text task the ids it misses
    are the zeros its tokenizer would give."""
    config = load_config(name)
    check_fine_tuned(name, config, "teacher", "distil from a model fine-tuned on the task")
    check_max_seq_length(config, max_seq_length)
    check_tokenizer_fits(name, config, tokenizer)  # it reads the student's ids
    if load_tokenizer(name).get_vocab() != tokenizer.get_vocab():
        raise UsageError(f"teacher '{name}' has another tokenizer vocabulary than the student: both must read the same ids")
    model = load_classifier(name).eval()
    missing = [k for k in model_input_names(model) if k not in student_inputs]
    if pairs and missing:
        raise UsageError(f"teacher '{name}' reads {', '.join(missing)}, which the student's inputs "
                         f"({', '.join(student_inputs)}) do not carry: on a text-pair task it would see every token "
                         "as the first text's; distil from a teacher that takes the student's inputs")
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        teacher_map = label_mapping(spec, model.config)  # raises on a label count / name mismatch
    except UsageError as e:
        raise UsageError(f"teacher '{name}': {e}") from None
    return model, student_order(teacher_map, student_mapping, spec.num_labels)


def student_order(teacher_mapping, student_mapping, num_labels: int):
    """Indices j -> teacher column for student column j (None: the same order)."""
    if teacher_mapping is None and student_mapping is None:
        return None
    n = num_labels
    t = np.arange(n) if teacher_mapping is None else np.asarray(teacher_mapping)
    s = np.arange(n) if student_mapping is None else np.asarray(student_mapping)
    order = t[np.argsort(s)]  # student column j holds data label argsort(s)[j]
    return None if (order == np.arange(n)).all() else torch.as_tensor(order)


def model_teacher(model, order, input_names, autocast):
    """A separate frozen classifier as a teacher: its logits in the student's label order."""
    names = list(input_names)

    @torch.no_grad()
    def teacher(batch):
        with autocast():
            out = model(**{k: v for k, v in batch.items() if k in names})
        logits = out.logits.float()
        return logits if order is None else logits[:, order.to(logits.device)]

    return teacher
