"""What finetune and compress share: one training run's state and the pieces its recipe strings
together, in this order (finetune.py and compress.py read top to bottom over them):

    read_inputs -> (the recipe's model) -> encode_data -> start_accelerator -> make_optimizer
    -> start (counters, per-rank seed, --resume) -> loop: batches / optimizer_step / advance /
    evaluate_every / checkpoint_every -> write_output

`Run` holds the state; nothing here calls back into a recipe (no hooks): what differs between
recipes (the model, the loss, which batches train, which weights are kept) is written in the
recipe's own file and handed in as values.

Checkpoints (format /3, one file O.partial/checkpoint.pt, written atomically): everything a
resumed run needs, every rank's RNG states and the named generators every rank shares (compress:
the replacement draws), the best weights included; a resumed run is bit-identical to an
uninterrupted one (tests/test_train.py).
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
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from tqdm.auto import tqdm

from .. import config as C
from .. import dist
from ..data import check_training_labels, encode, label_mapping, load_from_config, make_loader, positive_id
from ..distill import check_for_task
from ..errors import UsageError
from ..hf import (check_max_seq_length, check_model_source, check_tokenizer_fits, load_config, load_tokenizer,
                  model_input_names)
from ..io import atomic_output_dir, check_output_dir, dumps, write_json
from ..loyalty import describe, loyalty
from ..metrics import compute_metrics
from ..optim import configure_optimizers, lr_schedule
from .common import log, predict, protected_inputs, rank_loader

# /3: every rank's RNG states and the process count (/2 held rank 0's torch RNG only)
CHECKPOINT_FORMAT = "theseus-deploy-checkpoint/3"


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


class Run:
    """The state of one training run (a recipe subclasses it to hold that state, and writes its
    own `setup`, `train` and `save` out of the methods below)."""

    kind = ""  # "finetune" / "compress": the log prefix, the default lr, the checkpoint's kind

    def __init__(self, cfg):
        self.cfg = cfg
        self.paused = False       # stopped by --stop-after-steps: checkpoint written, no output yet
        self.distiller = None     # distill.Distiller with --distill-alpha > 0
        self.reference_logits = None  # dev logits loyalty is measured against, if any
        self.late = []            # trainable tensors at lr 0 until the schedule's late start (compress --unfreeze-head)
        self.generators = {}      # name -> torch.Generator shared by every rank, checkpointed by name

    # ================================================================== setup
    def read_inputs(self):
        """Flags, output folder, model source and data, checked before any model is loaded."""
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
        check_output_dir(self.output, cfg.overwrite, protected=protected_inputs(cfg))  # --resume too: a killed run wrote no output
        if not cfg.model:
            raise UsageError("--model is required")
        check_model_source(cfg.model)  # a mistyped path is reported before any data is read
        check_max_seq_length(load_config(cfg.model), cfg.max_seq_length)
        # Data next: bad files fail before any model is loaded.
        self.train_data = load_from_config(cfg, "train")
        check_training_labels(self.train_data)
        self.dev_data = load_from_config(cfg, "dev", spec=self.train_data.spec)
        self.spec = self.train_data.spec
        check_for_task(cfg.distill_alpha, cfg.distill_temperature, self.spec.is_regression)
        self.tokenizer = load_tokenizer(cfg.model)
        check_tokenizer_fits(cfg.model, load_config(cfg.model), self.tokenizer)

    def encode_data(self, hf_config):
        """Train and dev sets in the model's token and label ids."""
        self.hf_config = hf_config
        self.mapping = mapping = label_mapping(self.spec, hf_config)
        self.positive = positive_id(self.spec, mapping)  # F1's positive class, in the model's label ids
        names = model_input_names(hf_config)
        self.train_enc = encode(self.tokenizer, self.train_data, self.cfg.max_seq_length, names, mapping)
        self.dev_enc = encode(self.tokenizer, self.dev_data, self.cfg.max_seq_length, names, mapping)

    def start_accelerator(self, unused_parameters: bool):
        """The accelerator, the checkpoint of a --resume (checked: a resume that cannot work fails
        here), the step budget and the learning rate. `unused_parameters`: DDP must expect
        parameters without a gradient on some steps."""
        cfg = self.cfg
        ddp = DistributedDataParallelKwargs(find_unused_parameters=unused_parameters)
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp])
        self.saved = self.read_checkpoint() if cfg.resume else None
        n_batches = math.ceil(len(self.train_enc.features) / cfg.batch_size)
        self.steps_per_epoch = max(1, math.ceil(n_batches / self.acc.num_processes))
        self.total_steps, self.epochs = resolve_budget(cfg, len(self.train_enc.features), self.steps_per_epoch)
        self.eval_steps = cfg.eval_steps or self.steps_per_epoch
        self.save_steps = cfg.save_steps or self.eval_steps
        self.lr = cfg.lr if cfg.lr is not None else C.DEFAULT_LR[self.kind]

    def make_optimizer(self, model, late: list = (), late_start: int | None = None):
        """AdamW over what requires grad now (`late`: at lr 0 until step `late_start`), its
        schedule, and model + optimizer on the accelerator's device(s). The trainable set is final
        here, before wrapping: DDP all-reduces exactly these tensors."""
        cfg = self.cfg
        late = list(late)
        self.optimizer = configure_optimizers(model, self.lr, cfg.weight_decay,
                                              decay_norm_and_bias=cfg.decay_norm_and_bias, late=late)
        self.lr_schedule = lr_schedule(self.optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps,
                                       late_start=late_start)
        self.late = late
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.dev_loader = make_loader(self.tokenizer, self.dev_enc, cfg.eval_batch_size, False)  # predict() deals it

    def start(self, generators: dict | None = None):
        """Step 0 (or the checkpoint's step with --resume). `generators`: shared by every rank,
        saved and restored by name."""
        self.generators = dict(generators or {})
        self.step, self.best_score, self.best_step, self.bad_evals = 0, -math.inf, -1, 0
        self.best_state, self.best_metrics, self.best_loyalty = None, None, None
        self.history: list[dict] = []
        self.pending = {"losses": [], "norms": [], "skipped": 0}  # for the next log line (skipped: since step 0)
        # Dropout: rank r draws from seed + r (one process: --seed as before), not every rank the same masks.
        torch.manual_seed((self.cfg.seed + self.acc.process_index) % 2 ** 64)
        if self.cfg.resume:
            self.load_checkpoint()

    # ================================================================== the loop
    @contextlib.contextmanager
    def progress(self):
        """Training mode, the run's opening line and its progress bar, ended (its line closed)
        before any error line, never glued to it."""
        self.model.train()
        self.t0 = time.time()
        log(f"[{self.kind}] {len(self.train_enc.features)} train / {len(self.dev_enc.features)} dev examples, "
            f"{self.total_steps} steps ({self.epochs:g} epochs of {self.steps_per_epoch}), lr {self.lr:g}")
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.acc.is_main_process, desc="train",
                   dynamic_ncols=True, file=sys.stderr)
        try:
            yield bar
        finally:
            bar.close()

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
            for batch in rank_loader(loader, mine):
                yield {k: v.to(acc.device) for k, v in batch.items()}
                if self.step >= self.total_steps:
                    return

    def optimizer_step(self, loss, frozen: list = (), soft: float | None = None):
        """Backward, clip, AdamW step on `loss`; `frozen` tensors get no update and no AdamW moments
        on this step. The loss (mean over ranks), the gradient norm before clipping and, with
        distillation, the soft-target term alone (`soft`, mean over ranks) go to the next log line."""
        self.check_finite(loss)
        self.acc.backward(loss)
        for p in frozen:
            p.grad = None
        grad_norm = None
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(self.acc.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending["losses"].append(dist.mean(loss.item()))  # the same global figure on every rank
        if soft is not None:  # a checkpoint written before soft losses were logged has no list yet
            self.pending.setdefault("soft", []).append(dist.mean(soft))
        if grad_norm is not None and math.isfinite(grad_norm):
            self.pending["norms"].append(grad_norm)

    def check_finite(self, loss):
        bad = (~torch.isfinite(loss.detach())).float()
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, "sum")  # every rank stops together
        if bad.item() > 0:
            raise UsageError(f"[{self.kind}] the training loss is {loss.item()} at step {self.step}: training diverged, "
                             f"nothing was saved (check the model's weights and the data, or lower --lr)")

    def advance(self, bar, extra: dict | None = None) -> bool:
        """The step is done (trained or skipped): lr schedule and step count advance, and every
        --log-steps a log line (with `extra`, e.g. compress's p). True at the last step."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
            self.lr_schedule.step()
        self.step += 1
        bar.update(1)
        last = self.step == self.total_steps
        if self.step % self.cfg.log_steps == 0 or last:
            losses, norms = self.pending["losses"], self.pending["norms"]
            rec = {"step": self.step, "loss": float(np.mean(losses)) if losses else None,
                   "grad_norm": float(np.mean(norms)) if norms else None,
                   "lr": self.lr_schedule.get_last_lr()[0], "skipped_batches": self.pending["skipped"],
                   "elapsed_s": round(time.time() - self.t0, 2), **(extra or {})}
            if self.distiller is not None:  # the soft-target term beside the combined loss
                soft = self.pending.setdefault("soft", [])
                rec["soft_loss"] = float(np.mean(soft)) if soft else None
                soft.clear()
            self.history.append(rec)
            bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in rec.items() if k in ("loss", "p")})
            losses.clear()
            norms.clear()
        return last

    def evaluate_every(self, last: bool, weights, counts_for_patience: bool = True, extra: dict | None = None) -> bool:
        """Every --eval-steps and at the last step: dev evaluation, keeping `weights()` (a state
        dict) when the score improves. `counts_for_patience`: whether an evaluation without
        improvement counts toward --early-stopping-patience. True when early stopping says stop."""
        if not (self.step % self.eval_steps == 0 or last):
            return False
        logits, labels = predict(self.model, self.dev_loader, self.acc)
        metrics = compute_metrics(self.spec, logits, labels, self.positive)
        if not all(math.isfinite(v) for v in metrics.values()):
            raise UsageError(f"[{self.kind}] dev metrics are not finite at step {self.step} ({metrics}): "
                             "the model outputs NaN or inf, nothing was saved")
        loy = None if self.reference_logits is None else loyalty(logits, self.reference_logits, self.spec.is_regression)
        self.history.append({"step": self.step, "eval": metrics, **({"loyalty": loy} if loy else {}), **(extra or {})})
        log(f"[{self.kind}] step {self.step}: dev " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            + (f"; loyalty {describe(loy)}" if loy else ""))
        if metrics["score"] > self.best_score:
            self.best_score, self.best_step, self.bad_evals = metrics["score"], self.step, 0
            self.best_metrics, self.best_loyalty = metrics, loy
            self.best_state = {k: v.detach().cpu().clone() for k, v in weights().items()}
        elif counts_for_patience:
            self.bad_evals += 1
        patience = self.cfg.early_stopping_patience
        return patience is not None and self.bad_evals >= patience

    def checkpoint_every(self, last: bool) -> bool:
        """Every --save-steps (not at the last step: the output follows) a checkpoint; at
        --stop-after-steps a checkpoint and a pause. True when paused."""
        if self.step % self.save_steps == 0 and not last:
            self.save_checkpoint()
        stop_at = self.cfg.stop_after_steps
        if stop_at is not None and self.step >= stop_at:
            self.save_checkpoint()
            self.paused = True
        return self.paused

    # ================================================================== checkpoints
    def save_checkpoint(self):
        """One file, written atomically, holding everything a resumed run needs, the best weights
        included (a separate best.pt could be newer than the checkpoint it belongs to). Only
        tensors and plain types: it is read back with torch.load(weights_only=True). Every rank's RNG
        states are gathered into it (a collective: every rank calls this at the same steps)."""
        rngs = dist.gather(dist.rng_state())
        shared = {}
        for name, gen in self.generators.items():
            state = gen.get_state()
            # Shared, not per rank: every rank's generator must be where rank 0's is.
            if any(not torch.equal(state, other) for other in dist.gather(state)):
                raise RuntimeError(f"the {name} generators differ between ranks")
            shared[name] = state
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
            **shared,
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

    def check_resume_config(self, saved: dict):
        """A resumed run must be the same run: the fields marked `resume=True` in config.py decide
        data order, draws, p, lr and what is evaluated and kept at every step. A field the
        checkpoint's config lacks (an option added since it was written, e.g. --distill-alpha) had
        its default then: an option is added with a default that keeps the run as it was."""
        now = C.to_dict(self.cfg)
        saved = {**C.defaults(self.cfg), **saved}
        diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in C.resume_fields(self.cfg)
                if k in now and saved.get(k) != now[k]]
        if diff:
            raise UsageError("--resume with settings that differ from the checkpoint's run: " + ", ".join(diff))

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
            for name, gen in self.generators.items():
                gen.set_state(state[name])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UsageError(f"--resume: {path} does not fit this run ({type(e).__name__}: {first})") from None
        log(f"[{self.kind}] resumed from {path} at step {self.step}")
        if self.best_step >= 0 and self.best_loyalty is None and self.reference_logits is not None:
            # a checkpoint from before loyalty was measured: its kept weights' figure was never taken
            log(f"[{self.kind}] the checkpoint's best weights (step {self.best_step}) have no loyalty figure (it "
                "was written before loyalty was measured): metrics.json gets one only if a later evaluation "
                "improves on them; `evaluate --model OUTPUT --reference MODEL` measures it for the saved model")

    # ================================================================== output
    def run_config(self) -> dict:
        """run_config.json: the flags and what the run resolved from them."""
        return {**C.to_dict(self.cfg), "command": self.kind, "lr": self.lr, "epochs": self.epochs,
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "eval_steps": self.eval_steps, "save_steps": self.save_steps,
                "num_train_examples": len(self.train_data), "num_dev_examples": len(self.dev_data),
                "data_source": {"train": self.train_data.source, "dev": self.dev_data.source},
                "num_processes": self.acc.num_processes}

    def metrics(self) -> dict:
        """metrics.json: the kept (best) weights' dev figures."""
        out = {"task": self.spec.name, "best_step": self.best_step, "dev": self.best_metrics}
        if self.best_loyalty is not None:  # of the kept (best) weights, on the dev rows
            out["loyalty"] = self.best_loyalty
        if self.distiller is not None:
            out["distill"] = {"alpha": self.cfg.distill_alpha, "temperature": self.cfg.distill_temperature}
        return out

    def write_output(self, make_model, run_config: dict, metrics: dict):
        """The output folder, atomically, from the main process once every rank is here: the model
        (`make_model()`, built on the main process only) with the best weights, its tokenizer,
        run_config.json, metrics.json, train_log.jsonl; then the checkpoints in O.partial/ are removed."""
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return
        model = make_model()
        model.load_state_dict(self.best_state)
        with atomic_output_dir(self.output, overwrite=self.cfg.overwrite, protected=protected_inputs(self.cfg)) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / "run_config.json", run_config)
            write_json(tmp / "metrics.json", metrics)
            with open(tmp / "train_log.jsonl", "w") as f:
                for rec in self.history:
                    f.write(dumps(rec) + "\n")  # strict JSON: NaN/inf as null
        shutil.rmtree(self.work, ignore_errors=True)
        log(f"[{self.kind}] saved {self.output} (best dev score {self.best_score:.4f} at step {self.best_step})")
