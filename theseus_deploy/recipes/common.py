"""What every recipe uses: scoring a model over a loader (`predict`), progress lines on stderr,
results and the result table on stdout (main process only), and the inputs an output may not be."""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import dist


def log(msg: str):
    """A progress line, from the main process only (one line per run, not one per rank)."""
    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


def say(text: str):
    """A result on stdout, from the main process only."""
    if dist.is_main():
        print(text)


def print_table(rows: list[tuple[str, dict]], metrics: tuple):
    """One row per model: its name, then each of the task's metrics and the score."""
    head = f"{'model':<28}" + "".join(f"{m:>10}" for m in metrics + ("score",))
    say("\n".join([head] + [f"{name:<28}" + "".join(f"{m[k]:>10.4f}" for k in metrics + ("score",))
                            for name, m in rows]))


def protected_inputs(cfg) -> list:
    """What a run reads: its output may not be (or contain) any of these."""
    return [cfg.model, cfg.data_dir, cfg.train_file, cfg.validation_file,
            getattr(cfg, "teacher", None), getattr(cfg, "reference", None)]


def rank_loader(loader, batches):
    """`loader` (a make_loader DataLoader) over the batch list `batches` instead of its own."""
    return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn,
                      generator=torch.Generator())  # private: iterating must not consume the global RNG


@torch.no_grad()
def predict(model, loader, accelerator=None, inputs: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a (make_loader) loader, in eval mode, every row exactly once and in order;
    `inputs`: only these batch entries reach the model (a teacher or reference that reads fewer inputs
    than the batches carry, as distill.model_teacher gives it). Under several processes rank r runs
    batches r, r+N, ... of the one-process batch list on the unwrapped model (no collective inside the
    loop, so a rank with one batch fewer cannot hang) and the logits are gathered once and put back in
    order: the rows, the batches and (on CPU) the logits bit for bit are those of one process."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator else next(model.parameters()).device
    world, rank = dist.world_size(), dist.rank()
    indices = list(range(len(loader.batch_sampler)))[rank::world]
    mine = loader if world == 1 else rank_loader(loader, dist.deal(loader.batch_sampler, world, rank, padded=False))
    out = []
    for i, batch in zip(indices, mine):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        if inputs is not None:
            batch = {k: v for k, v in batch.items() if k in inputs}
        logits = model(**batch).logits.float()
        out.append((i, logits.cpu().numpy(), labels.cpu().numpy()))
    model.train(was_training)
    if world > 1:
        out = sorted((rec for part in dist.gather(out) for rec in part), key=lambda rec: rec[0])
    return np.concatenate([r[1] for r in out]), np.concatenate([r[2] for r in out])
