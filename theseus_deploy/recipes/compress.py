"""`compress`: BERT-of-Theseus (Xu et al., EMNLP 2020) from a fine-tuned predecessor.

Each step draws, per module, whether its successor layer replaces its predecessor block, with
probability p from the replacement schedule (its own generator, seed + 1: resumable, the same on
every rank). Only the successor layers learn, from the task loss alone (with --distill-alpha also
from the predecessor's soft targets); with --unfreeze-head the pooler and classifier learn too once
p = 1 (the successor-only phase), at lr 0 and without gradients before. A step whose draws all
picked the predecessor has nothing to learn and is skipped (the schedules still advance).
The output is the plain successor model (modeling.TheseusModel.to_successor).
"""
from __future__ import annotations

import torch

from .. import config as C
from .. import dist, distill
from ..errors import UsageError
from ..hf import check_fine_tuned, load_classifier, load_config
from ..loyalty import describe
from ..metrics import compute_metrics
from ..modeling import TheseusModel
from ..schedulers import make_scheduler
from .common import log, predict, print_table, protected_inputs, say
from .loop import Run


class CompressRecipe(Run):
    kind = "compress"

    def setup(self):
        cfg = self.cfg
        self.read_inputs()
        torch.manual_seed(cfg.seed)

        # ------------------------------------------------------------ model
        # A bare encoder would load with a new random head: retention and loyalty would measure noise.
        check_fine_tuned(cfg.model, load_config(cfg.model), "--model",
                         "compress a model fine-tuned on the task (finetune gives one)")
        predecessor = load_classifier(cfg.model)
        n, depth = cfg.successor_layers, predecessor.config.num_hidden_layers
        if n is not None and not 1 <= n < depth:  # n = depth would "compress" into a copy of the predecessor
            raise UsageError(f"--successor-layers must be between 1 and {depth - 1} (the predecessor has {depth} "
                             f"layers), got {n}")
        self.theseus = theseus = TheseusModel(predecessor, cfg.successor_layers, cfg.init)
        if cfg.unfreeze_head:
            theseus.unfreeze_head()  # trainable from the start, at LR 0 until the successor-only phase
        if cfg.unfreeze_embeddings:
            if not theseus.embedding_parameters():
                raise UsageError(f"--unfreeze-embeddings: '{cfg.model}' has no embeddings module to train")
            theseus.unfreeze_embeddings()  # likewise
        self.encode_data(predecessor.config)
        self.start_accelerator(unused_parameters=True)  # DDP: a module that drew its predecessor has no gradient

        # ------------------------------------------------------------ replacement schedule
        steps_to_full = cfg.steps_to_full
        if steps_to_full is None and cfg.k is None:
            steps_to_full = max(1, self.total_steps // 4)  # p = 1 at a quarter (docs/results.md, ablation); then the successor alone
        self.scheduler = make_scheduler(cfg.scheduler, cfg.replacing_rate, steps_to_full, cfg.k)
        if not self.scheduler.successor_only(self.total_steps - 1):
            raise UsageError(f"the replacement schedule reaches p = 1 only at step {self.scheduler.steps_to_full}, "
                             f"but the run has {self.total_steps} steps: the successor would never run alone "
                             "(lower --steps-to-full, raise --k, or train longer)")
        self.replace_gen = torch.Generator().manual_seed((cfg.seed + 1) % 2 ** 64)  # draws: their own RNG, resumable
        log(f"[compress] {theseus.predecessor_layers} -> {theseus.num_modules} layers, blocks "
            f"{theseus.blocks}, init from {theseus.init_from}, {cfg.scheduler} schedule "
            f"b={self.scheduler.b:g} k={self.scheduler.k:.3g} (p=1 at step {self.scheduler.steps_to_full})")
        if cfg.distill_alpha > 0:  # Theseus + KD: the teacher is the predecessor inside the wrapper
            self.distiller = distill.Distiller(cfg.distill_alpha, cfg.distill_temperature, self.spec.is_regression,
                                               distill.theseus_teacher(theseus, self.acc.autocast,
                                                                        cfg.unfreeze_embeddings))

        # ------------------------------------------------------------ optimizer
        late = ((theseus.head_parameters() if cfg.unfreeze_head else [])
                + (theseus.embedding_parameters() if cfg.unfreeze_embeddings else []))
        self.make_optimizer(theseus, late=late, late_start=self.scheduler.steps_to_full if late else None)

        # The predecessor's own dev score (the retention figure) and logits (loyalty at every evaluation).
        theseus.force("predecessor")
        logits, labels = predict(self.model, self.dev_loader, self.acc)
        theseus.force(None)
        self.predecessor_metrics = compute_metrics(self.spec, logits, labels, self.positive)
        self.reference_logits = logits
        log(f"[compress] predecessor ({theseus.predecessor_layers} layers) dev: "
            + ", ".join(f"{k} {v:.4f}" for k, v in self.predecessor_metrics.items()))
        self.start(generators={"replace_gen": self.replace_gen})
        return self

    # ================================================================== train
    def train(self):
        with self.progress() as bar:
            for batch in self.batches():
                p = self.scheduler(self.step)
                successor_only = self.scheduler.successor_only(self.step)
                draws = self.theseus.sample(p, self.replace_gen)
                head_learns = bool(self.late) and successor_only
                if any(draws) or head_learns:
                    labels = batch.pop("labels")
                    out = self.model(**batch, labels=labels)
                    loss = out.loss if self.distiller is None else self.distiller.loss(out.loss, out.logits, batch)
                    self.optimizer_step(loss, frozen=[] if head_learns else self.late,
                                        soft=self.distiller.last_soft if self.distiller else None)
                else:
                    # Every module drew its predecessor: no trainable tensor in the graph, nothing
                    # to learn; the schedules still advance so p and lr follow the step count.
                    self.pending["skipped"] += 1

                record = {"p": round(p, 6)}
                last = self.advance(bar, record)
                # Only evaluations after a successor-only step count toward --early-stopping-patience:
                # the replacement phase's scores do not stop a run before the successor trained alone.
                stop = self.evaluate_every(last, weights=self.final_state_dict,
                                           counts_for_patience=successor_only, extra=record)
                if self.checkpoint_every(last) or stop:
                    break
        return self

    @property
    def head_unfrozen(self) -> bool:
        """Whether the head has started learning (--unfreeze-head and the successor-only phase reached)."""
        return bool(self.late) and self.scheduler.successor_only(self.step - 1)

    # ================================================================== save
    def final_state_dict(self) -> dict:
        """The weights an improving evaluation keeps: the plain successor's (predecessor blocks dropped)."""
        return self.theseus.successor_state_dict()

    def resolved_config(self) -> dict:
        t = self.theseus
        return {**self.run_config(), "predecessor_layers": t.predecessor_layers,
                "successor_layers": t.num_modules, "blocks": t.blocks, "init_from": t.init_from,
                "scheduler_b": self.scheduler.b, "scheduler_k": self.scheduler.k,
                "steps_to_full": self.scheduler.steps_to_full}

    def summary(self) -> dict:
        pred, succ = self.predecessor_metrics["score"], self.best_metrics["score"]
        return {**self.metrics(), "predecessor_dev": self.predecessor_metrics,
                "retention": succ / pred if pred > 0 else None,
                "predecessor_layers": self.theseus.predecessor_layers, "successor_layers": self.theseus.num_modules}

    def save(self):
        self.write_output(self.theseus.to_successor, self.resolved_config(), self.summary())
        return self


@dist.locks_output("cfg.output", protected=protected_inputs)  # held for the whole run, O.partial/ included
def run_compress(cfg: C.CompressConfig):
    r = CompressRecipe(cfg).setup().train()
    if r.paused:
        say(f"[compress] paused after step {r.step}: checkpoint in {r.work}; continue with --resume")
        return r
    r.save()
    s = r.summary()
    print_table([(f"predecessor ({s['predecessor_layers']} layers)", s["predecessor_dev"]),
                 (f"successor ({s['successor_layers']} layers)", s["dev"])], r.spec.metrics)
    if s["retention"] is not None:
        say(f"retention: {100 * s['retention']:.1f}%")
    if s.get("loyalty"):
        say(f"loyalty to the predecessor: {describe(s['loyalty'])}")
    return r
