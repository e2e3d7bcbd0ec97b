"""Recipes: finetune (gives the predecessor) and compress (BERT-of-Theseus), plus evaluate.

A recipe is one class read top to bottom: setup -> train -> save. Distribution and mixed
precision come from `accelerate` (`accelerate launch -m theseus_deploy compress ...`, or torchrun /
mpirun); the few decisions it cannot make for us (which rows each rank evaluates and trains on,
every rank's RNG in checkpoints, who holds the output lock) are in dist.py (docs/distributed.md).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import config as C
from . import dist
from .data import check_training_labels, encode, label_mapping, load_from_config, make_loader, positive_id
from .errors import UsageError
from .hf import check_max_seq_length, check_tokenizer_fits, load_classifier, load_config, load_tokenizer, model_input_names
from .io import atomic_output_dir, check_output_dir, check_output_file, dumps, write_json
from .loyalty import describe, loyalty, to_data_order
from .metrics import compute_metrics
from .optim import configure_optimizers, lr_schedule

# /3: every rank's RNG states and the process count (/2 held rank 0's torch RNG only)
CHECKPOINT_FORMAT = "theseus-deploy-checkpoint/3"


def log(msg: str):
    """A progress line, from the main process only (one line per run, not one per rank)."""
    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


def _rank_loader(loader, batches):
    """`loader` (a make_loader DataLoader) over the batch list `batches` instead of its own."""
    from torch.utils.data import DataLoader

    return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn,
                      generator=torch.Generator())  # private: iterating must not consume the global RNG


@torch.no_grad()
def predict(model, loader, accelerator=None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a (make_loader) loader, in eval mode, every row exactly once and in
    order. Under several processes rank r runs batches r, r+N, ... of the one-process batch list
    on the unwrapped model (no collective inside the loop, so a rank with one batch fewer cannot
    hang) and the logits are gathered once and put back in order: the rows, the batches and (on
    CPU) the logits bit for bit are those of one process."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator else next(model.parameters()).device
    world, rank = dist.world_size(), dist.rank()
    indices = list(range(len(loader.batch_sampler)))[rank::world]
    mine = loader if world == 1 else _rank_loader(loader, dist.deal(loader.batch_sampler, world, rank, padded=False))
    out = []
    for i, batch in zip(indices, mine):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        out.append((i, logits.cpu().numpy(), labels.cpu().numpy()))
    model.train(was_training)
    if world > 1:
        out = sorted((rec for part in dist.gather(out) for rec in part), key=lambda rec: rec[0])
    return np.concatenate([r[1] for r in out]), np.concatenate([r[2] for r in out])


def resolve_budget(cfg, n_train: int, steps_per_epoch: int) -> tuple[int, float]:
    """(total optimizer steps, epochs). Explicit --max-steps / --epochs win; otherwise the
    budget scales with the data: at least `min_steps` steps and 3 epochs, at most `max_epochs`."""
    if cfg.max_steps is not None:
        if cfg.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {cfg.max_steps}")
        return cfg.max_steps, cfg.max_steps / steps_per_epoch
    if cfg.epochs is not None:
        if cfg.epochs <= 0:
            raise UsageError(f"--epochs must be positive, got {cfg.epochs}")
        return max(1, math.ceil(cfg.epochs * steps_per_epoch)), cfg.epochs
    epochs = min(cfg.max_epochs, max(3, math.ceil(cfg.min_steps / steps_per_epoch)))
    return epochs * steps_per_epoch, float(epochs)


class Recipe:
    """What finetune and compress share: data, optimizer, loop, eval, checkpoints, output."""

    kind = "finetune"
    # What differs between recipes is declared, not switched on `kind`:
    unused_parameters = False  # DDP: some parameters get no gradient on some steps (Theseus draws)
    distiller = None           # distill.Distiller with --distill-alpha > 0 (setup_distill)
    reference_logits = None    # dev logits loyalty is measured against (compress: the predecessor's)

    def __init__(self, cfg):
        self.cfg = cfg
        self.resuming = bool(getattr(cfg, "resume", False))  # only configs with a --resume flag resume
        self.paused = False  # stopped by --stop-after-steps: checkpoint written, no output yet

    # ================================================================== setup
    def setup(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.cfg
        if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
            raise UsageError("batch sizes must be at least 1")
        for flag in ("log_steps", "eval_steps", "save_steps"):
            value = getattr(cfg, flag, None)
            if value is not None and value < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
        if cfg.max_seq_length < 8:
            raise UsageError(f"--max-seq-length must be at least 8, got {cfg.max_seq_length}")
        self.output = Path(cfg.output)
        self.work = self.output.with_name(self.output.name + ".partial")  # checkpoints live here
        check_output_dir(self.output, cfg.overwrite, protected=_inputs(cfg))  # --resume too: a killed run wrote no output

        from .hf import check_model_source

        if not cfg.model:
            raise UsageError("--model is required")
        check_model_source(cfg.model)  # a mistyped path is reported before any data is read
        check_max_seq_length(load_config(cfg.model), cfg.max_seq_length)
        # Data next: bad files fail before any model is loaded.
        self.train_data = load_from_config(cfg, "train")
        check_training_labels(self.train_data)
        self.dev_data = load_from_config(cfg, "dev", spec=self.train_data.spec)
        self.spec = self.train_data.spec
        self.tokenizer = load_tokenizer(cfg.model)
        check_tokenizer_fits(cfg.model, load_config(cfg.model), self.tokenizer)
        torch.manual_seed(cfg.seed)            # a new classifier head (finetune) depends on --seed
        self.model = self.build_model()        # sets self.hf_config
        self.mapping = mapping = label_mapping(self.spec, self.hf_config)
        self.positive = positive_id(self.spec, mapping)  # F1's positive class, in the model's label ids
        names = model_input_names(self.hf_config)
        self.train_enc = encode(self.tokenizer, self.train_data, cfg.max_seq_length, names, mapping)
        self.dev_enc = encode(self.tokenizer, self.dev_data, cfg.max_seq_length, names, mapping)

        ddp = DistributedDataParallelKwargs(find_unused_parameters=self.unused_parameters)
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp])
        self.saved = self.read_checkpoint() if self.resuming else None  # a resume that cannot work fails here
        n_batches = math.ceil(len(self.train_enc.features) / cfg.batch_size)
        self.steps_per_epoch = max(1, math.ceil(n_batches / self.acc.num_processes))
        self.total_steps, self.epochs = resolve_budget(cfg, len(self.train_enc.features), self.steps_per_epoch)
        self.eval_steps = cfg.eval_steps or self.steps_per_epoch
        self.save_steps = cfg.save_steps or self.eval_steps
        self.lr = cfg.lr if cfg.lr is not None else C.DEFAULT_LR[self.kind]
        self.setup_extra()
        self.setup_distill()

        # The trainable set is final here, before wrapping: DDP all-reduces exactly these tensors.
        late = self.late_parameters()
        self.optimizer = configure_optimizers(self.model, self.lr, cfg.weight_decay,
                                              decay_norm_and_bias=cfg.decay_norm_and_bias, late=late)
        self.lr_schedule = lr_schedule(self.optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps,
                                       late_start=self.late_start())
        self.late = late
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
        self.dev_loader = make_loader(self.tokenizer, self.dev_enc, cfg.eval_batch_size, False)  # predict() deals it
        self.after_prepare()
        self.step, self.best_score, self.best_step, self.bad_evals = 0, -math.inf, -1, 0
        self.best_state, self.best_metrics, self.best_loyalty = None, None, None
        self.history: list[dict] = []
        self.pending = {"losses": [], "norms": [], "skipped": 0}  # for the next log line (skipped: since step 0)
        # Dropout: rank r draws from seed + r (one process: --seed as before), not every rank the same masks.
        torch.manual_seed((cfg.seed + self.acc.process_index) % 2 ** 64)
        if self.resuming:
            self.load_checkpoint()
        return self

    def build_model(self):
        if self.spec.is_regression:
            # no label names: setting id2label at all (even to None) would reset num_labels in transformers 5
            labels = {"problem_type": "regression"}
        else:
            labels = {"id2label": dict(enumerate(self.spec.label_names)),
                      "label2id": {n: i for i, n in enumerate(self.spec.label_names)},
                      "problem_type": "single_label_classification"}
        model = load_classifier(self.cfg.model, num_labels=self.spec.num_labels, **labels)
        if self.cfg.keep_layers is not None:
            model = truncate(model, self.cfg.keep_layers)
        self.hf_config = model.config
        if self.cfg.freeze_layers > 0:
            from .modeling import find_layers
            base = model.base_model
            for p in base.embeddings.parameters():
                p.requires_grad_(False)
            parent, attr, _ = find_layers(model)
            for layer in list(getattr(parent, attr))[: self.cfg.freeze_layers]:
                for p in layer.parameters():
                    p.requires_grad_(False)
        return model

    def setup_extra(self):
        pass

    def setup_distill(self):
        """Sets `self.distiller` when --distill-alpha > 0 (each recipe names its teacher)."""

    def late_parameters(self) -> list:
        """Trainable tensors whose learning rate is 0 until `late_start()` (compress --unfreeze-head)."""
        return []

    def late_start(self) -> int | None:
        return None

    def after_prepare(self):
        """Called once model, optimizer and dev loader are on the accelerator's device(s)."""

    # ================================================================== train
    def before_step(self) -> bool:
        """Called before each batch; False means: nothing to train on this batch."""
        return True

    def late_active(self) -> bool:
        """Whether the `late` parameters learn on this step."""
        return True

    def step_log(self) -> dict:
        return {}

    def batches(self):
        """This rank's training batches from the current step on, epoch after epoch: the epoch's batch
        list (seed, epoch) padded to a multiple of the process count from its own start and dealt
        batch i to rank i mod N (dist.deal); a resumed run skips the steps it already trained, so
        every rank sees exactly what it saw in an uninterrupted run."""
        cfg, acc = self.cfg, self.acc
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            loader = make_loader(self.tokenizer, self.train_enc, cfg.batch_size, True, cfg.seed, epoch,
                                 group_by_length=cfg.group_by_length)
            mine = dist.deal(loader.batch_sampler, acc.num_processes, acc.process_index, padded=True)[skip:]
            for batch in _rank_loader(loader, mine):
                yield {k: v.to(acc.device) for k, v in batch.items()}
                if self.step >= self.total_steps:
                    return

    def train_step(self, batch) -> tuple[float, float | None]:
        """Forward, backward, clip, AdamW step: (loss, gradient norm before clipping)."""
        labels = batch.pop("labels")
        out = self.model(**batch, labels=labels)
        loss = out.loss if self.distiller is None else self.distiller.loss(out.loss, out.logits, batch)
        self.check_finite(loss)
        self.acc.backward(loss)
        if not self.late_active():
            for p in self.late:  # frozen until their phase: no update, no AdamW moments
                p.grad = None
        grad_norm = None
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(self.acc.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), (grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None)

    def check_finite(self, loss):
        bad = (~torch.isfinite(loss.detach())).float()
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, "sum")  # every rank stops together
        if bad.item() > 0:
            raise UsageError(f"[{self.kind}] the training loss is {loss.item()} at step {self.step}: training diverged, "
                             f"nothing was saved (check the model's weights and the data, or lower --lr)")

    def train(self):
        cfg = self.cfg
        self.model.train()
        t0 = time.time()
        losses, norms = self.pending["losses"], self.pending["norms"]  # since the last log line, checkpointed
        log(f"[{self.kind}] {len(self.train_enc.features)} train / {len(self.dev_enc.features)} dev examples, "
            f"{self.total_steps} steps ({self.epochs:g} epochs of {self.steps_per_epoch}), lr {self.lr:g}")
        progress = _progress(self.total_steps, self.step, self.acc.is_main_process)
        try:  # the bar is ended (its line closed) before any error line, never glued to it
            for batch in self.batches():
                if self.before_step():
                    loss, grad_norm = self.train_step(batch)
                    losses.append(dist.mean(loss))  # the mean over ranks: the same global figure on every rank
                    if grad_norm is not None:
                        norms.append(grad_norm)
                else:
                    # Every module drew its predecessor: no trainable tensor in the graph, nothing
                    # to learn; the schedules still advance so p and lr follow the step count.
                    self.pending["skipped"] += 1
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
                    self.lr_schedule.step()
                self.step += 1
                progress.update(1)

                last, stop = self.step == self.total_steps, False
                if self.step % cfg.log_steps == 0 or last:
                    rec = {"step": self.step, "loss": float(np.mean(losses)) if losses else None,
                           "grad_norm": float(np.mean(norms)) if norms else None,
                           "lr": self.lr_schedule.get_last_lr()[0], "skipped_batches": self.pending["skipped"],
                           "elapsed_s": round(time.time() - t0, 2), **self.step_log()}
                    self.history.append(rec)
                    progress.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v)
                                          for k, v in rec.items() if k in ("loss", "p")})
                    losses.clear()
                    norms.clear()
                if self.step % self.eval_steps == 0 or last:
                    stop = self.evaluate_and_track()
                if self.step % self.save_steps == 0 and not last:
                    self.save_checkpoint()
                stop_at = getattr(self.cfg, "stop_after_steps", None)
                if stop_at is not None and self.step >= stop_at:
                    self.save_checkpoint()
                    self.paused = True
                    break
                if stop:
                    break
        finally:
            progress.close()
        return self

    def evaluate_and_track(self) -> bool:
        """Dev evaluation; keeps the best weights; True when early stopping says stop."""
        logits, labels = predict(self.model, self.dev_loader, self.acc)
        metrics = compute_metrics(self.spec, logits, labels, self.positive)
        if not all(math.isfinite(v) for v in metrics.values()):
            raise UsageError(f"[{self.kind}] dev metrics are not finite at step {self.step} ({metrics}): "
                             "the model outputs NaN or inf, nothing was saved")
        loy = None if self.reference_logits is None else loyalty(logits, self.reference_logits, self.spec.is_regression)
        self.history.append({"step": self.step, "eval": metrics, **({"loyalty": loy} if loy else {}), **self.step_log()})
        log(f"[{self.kind}] step {self.step}: dev " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            + (f"; loyalty {describe(loy)}" if loy else ""))
        if metrics["score"] > self.best_score:
            self.best_score, self.best_step, self.bad_evals = metrics["score"], self.step, 0
            self.best_metrics, self.best_loyalty = metrics, loy
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.final_state_dict().items()}
        elif self.counts_for_patience():
            self.bad_evals += 1
        patience = self.cfg.early_stopping_patience
        return patience is not None and self.bad_evals >= patience

    def counts_for_patience(self) -> bool:
        """Whether an evaluation without improvement counts toward --early-stopping-patience."""
        return True

    # ================================================================== checkpoints
    def checkpoint_state(self) -> dict:
        return {}

    def save_checkpoint(self):
        """One file, written atomically, holding everything a resumed run needs, the best weights
        included (a separate best.pt could be newer than the checkpoint it belongs to). Only
        tensors and plain types: it is read back with torch.load(weights_only=True). Every rank's RNG
        states are gathered into it (a collective: every rank calls this at the same steps)."""
        rngs = dist.gather(dist.rng_state())
        extra = self.checkpoint_state()
        if not self.acc.is_main_process:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        state = {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "config": C.to_dict(self.cfg),
            "step": self.step,
            "model": {k: v for k, v in self.acc.unwrap_model(self.model).state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "num_processes": self.acc.num_processes,
            "rng": rngs,  # one entry per rank
            "best": {"score": float(self.best_score), "step": self.best_step, "bad_evals": self.bad_evals,
                     "metrics": self.best_metrics, "state": self.best_state, "loyalty": self.best_loyalty},
            "history": self.history,
            "pending": self.pending,
            **extra,
        }
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint.pt.", dir=self.work)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
            os.replace(tmp, self.work / "checkpoint.pt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the first checkpoint failed (a full disk): no empty O.partial/ left
                self.work.rmdir()
            raise

    def read_checkpoint(self) -> dict:
        """The checkpoint of this run, checked (format, settings, process count) before any work."""
        path = self.work / "checkpoint.pt"
        if not path.is_file():
            raise UsageError(f"--resume: no checkpoint at {path}")
        try:  # weights_only: tensors and plain types only, never code (a crafted pickle is refused)
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UsageError(f"--resume: cannot read {path}: truncated, corrupt or not a checkpoint of this tool "
                             f"({type(e).__name__}: {first})") from None
        if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT and state.get("kind") == self.kind
                and isinstance(state.get("config"), dict)):
            raise UsageError(f"--resume: {path} is not a {self.kind} checkpoint of this tool (format "
                             f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
        self.check_resume_config(state["config"])
        saved_n, n = state.get("num_processes"), self.acc.num_processes
        if saved_n != n:
            raise UsageError(f"--resume: the checkpoint was written by a run of {saved_n} processes, this run has {n}: "
                             f"a step is --batch-size x processes examples, so the data order and the batch of every "
                             f"later step would change; resume with {saved_n} processes (docs/distributed.md)")
        return state

    def load_checkpoint(self):
        path, state, self.saved = self.work / "checkpoint.pt", self.saved, None
        try:
            self.acc.unwrap_model(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_schedule"])
            dist.set_rng_state(state["rng"][self.acc.process_index])  # this rank's own
            best = state["best"]
            self.step = int(state["step"])
            self.best_score, self.best_step, self.bad_evals = best["score"], best["step"], best["bad_evals"]
            self.best_metrics, self.best_state = best["metrics"], best["state"]
            self.best_loyalty = best.get("loyalty")
            if self.best_step >= 0 and not self.best_state:
                raise ValueError("best weights missing")
            self.history = state["history"]
            self.pending = state["pending"]
            self.restore_extra(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UsageError(f"--resume: {path} does not fit this run ({type(e).__name__}: {first})") from None
        log(f"[{self.kind}] resumed from {path} at step {self.step}")

    def restore_extra(self, state: dict):
        pass

    def check_resume_config(self, saved: dict):
        """A resumed run must be the same run: the fields marked `resume=True` in config.py decide
        data order, draws, p, lr and what is evaluated and kept at every step."""
        now = C.to_dict(self.cfg)
        diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in C.resume_fields(self.cfg)
                if k in now and saved.get(k) != now[k]]
        if diff:
            raise UsageError("--resume with settings that differ from the checkpoint's run: " + ", ".join(diff))

    # ================================================================== save
    def final_state_dict(self) -> dict:
        return self.acc.unwrap_model(self.model).state_dict()

    def final_model(self):
        """The plain HF model with the best weights."""
        model = self.acc.unwrap_model(self.model)
        model.load_state_dict(self.best_state)
        return model

    def resolved_config(self) -> dict:
        return {**C.to_dict(self.cfg), "command": self.kind, "lr": self.lr, "epochs": self.epochs,
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "eval_steps": self.eval_steps, "save_steps": self.save_steps,
                "num_train_examples": len(self.train_data), "num_dev_examples": len(self.dev_data),
                "data_source": {"train": self.train_data.source, "dev": self.dev_data.source},
                "num_processes": self.acc.num_processes}

    def summary(self) -> dict:
        out = {"task": self.spec.name, "best_step": self.best_step, "dev": self.best_metrics}
        if self.best_loyalty is not None:  # of the kept (best) weights, on the dev rows
            out["loyalty"] = self.best_loyalty
        if self.distiller is not None:
            out["distill"] = {"alpha": self.cfg.distill_alpha, "temperature": self.cfg.distill_temperature}
        return out

    def save(self):
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return self
        model = self.final_model()
        with atomic_output_dir(self.output, overwrite=self.cfg.overwrite, protected=_inputs(self.cfg)) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / "run_config.json", self.resolved_config())
            write_json(tmp / "metrics.json", self.summary())
            with open(tmp / "train_log.jsonl", "w") as f:
                for rec in self.history:
                    f.write(dumps(rec) + "\n")  # strict JSON: NaN/inf as null
        shutil.rmtree(self.work, ignore_errors=True)
        log(f"[{self.kind}] saved {self.output} (best dev score {self.best_score:.4f} at step {self.best_step})")
        return self


def truncate(model, keep_layers: int):
    """The bottom `keep_layers` layers of `model`, as a plain model (the truncation baseline)."""
    from .modeling import TheseusModel

    num_layers = model.config.num_hidden_layers
    if not 1 <= keep_layers <= num_layers:
        raise UsageError(f"--keep-layers must be between 1 and the model's {num_layers} layers, got {keep_layers}")
    theseus = TheseusModel(model, keep_layers, init="bottom")
    out = theseus.to_successor()
    for p in out.parameters():
        p.requires_grad_(True)
    return out.train()


class FinetuneRecipe(Recipe):
    kind = "finetune"

    def setup_distill(self):
        """Vanilla KD: a frozen teacher (--teacher, else --model as loaded before --keep-layers)."""
        from . import distill

        cfg = self.cfg
        if cfg.distill_alpha == 0:
            return
        self.teacher_name = cfg.teacher or cfg.model
        self.teacher, order = distill.load_teacher(self.teacher_name, self.spec, self.tokenizer, self.mapping,
                                                   cfg.max_seq_length)
        self.distiller = distill.Distiller(cfg.distill_alpha, cfg.distill_temperature, self.spec.is_regression,
                                           distill.model_teacher(self.teacher, order, model_input_names(self.teacher),
                                                                 self.acc.autocast))
        self.teacher_order = order
        log(f"[finetune] distilling from {self.teacher_name}: loss = {1 - cfg.distill_alpha:g} * task + "
            f"{cfg.distill_alpha:g} * soft (T = {cfg.distill_temperature:g})")

    def after_prepare(self):
        """Loyalty is measured against the teacher (KD), or with --keep-layers against --model as
        loaded before truncation when that is a classifier for the task (the truncation baseline)."""
        from . import distill

        if self.distiller is not None:
            ref, order = self.teacher, self.teacher_order
        elif self.cfg.keep_layers is not None:
            try:
                ref, order = distill.load_teacher(self.cfg.model, self.spec, self.tokenizer, self.mapping,
                                                  self.cfg.max_seq_length)
            except UsageError as e:  # a bare encoder (new head): nothing to be loyal to
                log(f"[finetune] no loyalty figure: {e}")
                return
        else:
            return
        ref.to(self.acc.device)
        logits, _ = predict(ref, self.dev_loader, self.acc)  # loyalty to it at every evaluation
        self.reference_logits = logits if order is None else logits[:, order.numpy()]

    def summary(self) -> dict:
        out = super().summary()
        if self.distiller is not None:
            out["distill"]["teacher"] = self.teacher_name
        return out


class CompressRecipe(Recipe):
    """BERT-of-Theseus: only the successor layers learn, from the task loss alone (and, with
    --unfreeze-head, the pooler and classifier once the successor trains alone)."""

    kind = "compress"
    unused_parameters = True

    def build_model(self):
        from .modeling import TheseusModel

        predecessor = load_classifier(self.cfg.model)
        self.hf_config = predecessor.config
        n, depth = self.cfg.successor_layers, predecessor.config.num_hidden_layers
        if n is not None and not 1 <= n < depth:  # n = depth would "compress" into a copy of the predecessor
            raise UsageError(f"--successor-layers must be between 1 and {depth - 1} (the predecessor has {depth} "
                             f"layers), got {n}")
        self.theseus = TheseusModel(predecessor, self.cfg.successor_layers, self.cfg.init)
        if self.cfg.unfreeze_head:
            self.theseus.unfreeze_head()  # trainable from the start, at LR 0 until the successor-only phase
        return self.theseus

    def setup_extra(self):
        from .schedulers import make_scheduler

        cfg = self.cfg
        steps_to_full = cfg.steps_to_full
        if steps_to_full is None and cfg.k is None:
            steps_to_full = max(1, self.total_steps // 4)  # p = 1 at a quarter (docs/results.md, ablation); then the successor alone
        self.scheduler = make_scheduler(cfg.scheduler, cfg.replacing_rate, steps_to_full, cfg.k)
        if not self.scheduler.successor_only(self.total_steps - 1):
            raise UsageError(f"the replacement schedule reaches p = 1 only at step {self.scheduler.steps_to_full}, "
                             f"but the run has {self.total_steps} steps: the successor would never run alone "
                             "(lower --steps-to-full, raise --k, or train longer)")
        self.replace_gen = torch.Generator().manual_seed((cfg.seed + 1) % 2 ** 64)  # draws: their own RNG, resumable
        self.last_p = self.scheduler(0)
        log(f"[compress] {self.theseus.predecessor_layers} -> {self.theseus.num_modules} layers, blocks "
            f"{self.theseus.blocks}, init from {self.theseus.init_from}, {cfg.scheduler} schedule "
            f"b={self.scheduler.b:g} k={self.scheduler.k:.3g} (p=1 at step {self.scheduler.steps_to_full})")

    def setup_distill(self):
        """Theseus + KD: the teacher is the predecessor inside the wrapper (its own blocks and head)."""
        from . import distill

        if self.cfg.distill_alpha > 0:
            self.distiller = distill.Distiller(self.cfg.distill_alpha, self.cfg.distill_temperature,
                                               self.spec.is_regression,
                                               distill.theseus_teacher(self.theseus, self.acc.autocast))

    def late_parameters(self) -> list:
        return self.theseus.head_parameters() if self.cfg.unfreeze_head else []

    def late_start(self) -> int | None:
        return self.scheduler.steps_to_full if self.cfg.unfreeze_head else None

    def after_prepare(self):
        # The predecessor's own dev score, for the retention figure (on the accelerator's devices).
        self.theseus.force("predecessor")
        logits, labels = predict(self.model, self.dev_loader, self.acc)
        self.theseus.force(None)
        self.predecessor_metrics = compute_metrics(self.spec, logits, labels, self.positive)
        self.reference_logits = logits  # loyalty of the successor to its predecessor at every evaluation
        log(f"[compress] predecessor ({self.theseus.predecessor_layers} layers) dev: "
            + ", ".join(f"{k} {v:.4f}" for k, v in self.predecessor_metrics.items()))

    def before_step(self) -> bool:
        p = self.scheduler(self.step)
        self.last_p = p
        draws = self.theseus.sample(p, self.replace_gen)
        return any(draws) or (bool(self.late) and self.late_active())

    def late_active(self) -> bool:
        return self.scheduler.successor_only(self.step)

    @property
    def head_unfrozen(self) -> bool:
        """Whether the head has started learning (--unfreeze-head and the successor-only phase reached)."""
        return bool(self.late) and self.scheduler.successor_only(self.step - 1)

    def step_log(self) -> dict:
        return {"p": round(self.last_p, 6)}

    def counts_for_patience(self) -> bool:
        # Only evaluations after at least one successor-only step: the replacement phase's scores
        # do not stop a run before the successor has trained alone.
        return self.scheduler.successor_only(self.step - 1)

    def checkpoint_state(self) -> dict:
        state = self.replace_gen.get_state()
        # The draws are shared, not per rank: every rank's generator must be where rank 0's is.
        if any(not torch.equal(state, other) for other in dist.gather(state)):
            raise RuntimeError("the replacement-draw generators differ between ranks")
        return {"replace_gen": state}

    def restore_extra(self, state):
        self.replace_gen.set_state(state["replace_gen"])

    def final_state_dict(self):
        return self.theseus.successor_state_dict()

    def final_model(self):
        model = self.theseus.to_successor()
        model.load_state_dict(self.best_state)
        return model

    def resolved_config(self) -> dict:
        t = self.theseus
        return {**super().resolved_config(), "predecessor_layers": t.predecessor_layers,
                "successor_layers": t.num_modules, "blocks": t.blocks, "init_from": t.init_from,
                "scheduler_b": self.scheduler.b, "scheduler_k": self.scheduler.k,
                "steps_to_full": self.scheduler.steps_to_full}

    def summary(self) -> dict:
        pred, succ = self.predecessor_metrics["score"], self.best_metrics["score"]
        return {**super().summary(), "predecessor_dev": self.predecessor_metrics,
                "retention": succ / pred if pred > 0 else None,
                "predecessor_layers": self.theseus.predecessor_layers, "successor_layers": self.theseus.num_modules}


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True, file=sys.stderr)


def _say(text: str):
    """A result on stdout, from the main process only."""
    if dist.is_main():
        print(text)


def _print_table(rows: list[tuple[str, dict]], metrics: tuple):
    head = f"{'model':<28}" + "".join(f"{m:>10}" for m in metrics + ("score",))
    _say("\n".join([head] + [f"{name:<28}" + "".join(f"{m[k]:>10.4f}" for k in metrics + ("score",))
                             for name, m in rows]))


# ====================================================================== entry points
def _inputs(cfg) -> list:
    """What a run reads: its output may not be (or contain) any of these."""
    return [cfg.model, cfg.data_dir, cfg.train_file, cfg.validation_file,
            getattr(cfg, "teacher", None), getattr(cfg, "reference", None)]


@dist.locks_output("cfg.output")  # held for the whole run, O.partial/ included
def run_finetune(cfg: C.FinetuneConfig):
    r = FinetuneRecipe(cfg).setup().train()
    if r.paused:
        _say(f"[finetune] paused after step {r.step}: checkpoint in {r.work}; continue with --resume")
        return r
    r.save()
    _print_table([(f"finetuned ({r.hf_config.num_hidden_layers} layers)", r.best_metrics)], r.spec.metrics)
    return r


@dist.locks_output("cfg.output")
def run_compress(cfg: C.CompressConfig):
    r = CompressRecipe(cfg).setup().train()
    if r.paused:
        _say(f"[compress] paused after step {r.step}: checkpoint in {r.work}; continue with --resume")
    else:
        r.save()
        s = r.summary()
        _print_table([(f"predecessor ({s['predecessor_layers']} layers)", s["predecessor_dev"]),
                      (f"successor ({s['successor_layers']} layers)", s["dev"])], r.spec.metrics)
        if s["retention"] is not None:
            _say(f"retention: {100 * s['retention']:.1f}%")
        if s.get("loyalty"):
            _say(f"loyalty to the predecessor: {describe(s['loyalty'])}")
    return r


@dist.locks_output("cfg.output")
def run_evaluate(cfg: C.EvaluateConfig) -> dict:
    from .data import spec_from_model

    st = dist.state()  # under a launcher: each rank scores its share of the batches (predict), rank 0 reports
    if cfg.output is not None:
        check_output_file(cfg.output, cfg.overwrite, protected=_inputs(cfg))
    model_config = load_config(cfg.model)
    check_max_seq_length(model_config, cfg.max_seq_length)
    if cfg.reference:  # a mistyped reference fails before any scoring
        check_max_seq_length(load_config(cfg.reference), cfg.max_seq_length)
    spec = spec_from_model(cfg, model_config)
    data = load_from_config(cfg, "train" if cfg.split == "train" else cfg.split, spec=spec)
    model = load_classifier(cfg.model).eval()
    if st.num_processes > 1:
        model.to(st.device)
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizer_fits(cfg.model, model.config, tokenizer)
    mapping = label_mapping(data.spec, model.config)
    enc = encode(tokenizer, data, cfg.max_seq_length, model_input_names(model), mapping)
    t0 = time.time()
    logits, labels = predict(model, make_loader(tokenizer, enc, cfg.batch_size, False))
    metrics = compute_metrics(data.spec, logits, labels, positive_id(data.spec, mapping))
    result = {"model": cfg.model, "task": data.spec.name, "split": cfg.split, "num_examples": len(data),
              "num_layers": model.config.num_hidden_layers, "metrics": metrics,
              "seconds": round(time.time() - t0, 3), "data_source": data.source, "num_processes": st.num_processes}
    if cfg.reference:  # every rank: predict() deals the reference's batches too
        result.update(_reference_loyalty(cfg, data, to_data_order(logits, mapping), st))
    if not st.is_main_process:
        return result
    if cfg.output is not None:
        write_json(cfg.output, result)
    if cfg.json:
        print(dumps(result, indent=2))
    else:
        rows = [(f"{Path(cfg.model).name} ({result['num_layers']} layers)", metrics)]
        if cfg.reference:
            rows.append((f"{Path(cfg.reference).name} ({result['reference_num_layers']} layers)", result["reference_metrics"]))
        _print_table(rows, data.spec.metrics)
        if cfg.reference:
            print(f"loyalty to {cfg.reference}: {describe(result['loyalty'])}")
    return result


def _reference_loyalty(cfg, data, logits, st) -> dict:
    """evaluate --reference: the reference model on the same rows (its own tokenizer and label
    ids), and the loyalty of --model to it; `logits` are --model's, in the data's label order."""
    ref_config = load_config(cfg.reference)
    check_max_seq_length(ref_config, cfg.max_seq_length)
    ref = load_classifier(cfg.reference).eval()
    if st.num_processes > 1:
        ref.to(st.device)
    tokenizer = load_tokenizer(cfg.reference)
    mapping = label_mapping(data.spec, ref.config)
    enc = encode(tokenizer, data, cfg.max_seq_length, model_input_names(ref), mapping)
    ref_logits, labels = predict(ref, make_loader(tokenizer, enc, cfg.batch_size, False))
    return {"reference": cfg.reference, "reference_num_layers": ref.config.num_hidden_layers,
            "reference_metrics": compute_metrics(data.spec, ref_logits, labels, positive_id(data.spec, mapping)),
            "loyalty": loyalty(logits, to_data_order(ref_logits, mapping), data.spec.is_regression)}
