"""`finetune`: train a classifier on a task; the result is the predecessor for `compress`.

Also the paper's baselines: `--keep-layers N` trains the bottom N layers of --model (truncation),
and with `--distill-alpha` against a frozen teacher (vanilla KD: --teacher, by default --model as
loaded before truncation). `--freeze-layers N` keeps the embeddings and the bottom N layers fixed.
"""
from __future__ import annotations

import torch

from .. import config as C
from .. import dist, distill
from ..errors import UsageError
from ..hf import load_classifier, model_input_names
from ..loyalty import describe
from ..modeling import find_layers, truncate
from .common import log, predict, print_table, protected_inputs, say
from .loop import Run


class FinetuneRecipe(Run):
    kind = "finetune"

    def setup(self):
        cfg = self.cfg
        self.read_inputs()
        torch.manual_seed(cfg.seed)  # a new classifier head depends on --seed

        # ------------------------------------------------------------ model
        model = self.build_model()
        self.encode_data(model.config)
        self.start_accelerator(unused_parameters=False)
        if cfg.distill_alpha > 0:  # vanilla KD: a frozen teacher on the same batch
            self.teacher_name = cfg.teacher or cfg.model
            self.teacher, self.teacher_order = distill.load_teacher(self.teacher_name, self.spec, self.tokenizer,
                                                                    self.mapping, cfg.max_seq_length,
                                                                    *self.student_inputs())
            self.distiller = distill.Distiller(cfg.distill_alpha, cfg.distill_temperature, self.spec.is_regression,
                                               distill.model_teacher(self.teacher, self.teacher_order,
                                                                     model_input_names(self.teacher), self.acc.autocast))
            log(f"[finetune] distilling from {self.teacher_name}: loss = {1 - cfg.distill_alpha:g} * task + "
                f"{cfg.distill_alpha:g} * soft (T = {cfg.distill_temperature:g})")

        # ------------------------------------------------------------ optimizer
        self.make_optimizer(model)
        self.reference_logits = self.reference()
        self.start()
        return self

    def build_model(self):
        """--model with a head for the task's labels, truncated to --keep-layers, bottom frozen."""
        cfg, spec = self.cfg, self.spec
        if spec.is_regression:
            # no label names: setting id2label at all (even to None) would reset num_labels in transformers 5
            labels = {"problem_type": "regression"}
        else:
            labels = {"id2label": dict(enumerate(spec.label_names)),
                      "label2id": {n: i for i, n in enumerate(spec.label_names)},
                      "problem_type": "single_label_classification"}
        model = load_classifier(cfg.model, num_labels=spec.num_labels, **labels)
        if cfg.keep_layers is not None:
            model = truncate(model, cfg.keep_layers)
        if cfg.freeze_layers > 0:
            for p in model.base_model.embeddings.parameters():
                p.requires_grad_(False)
            parent, attr, _ = find_layers(model)
            for layer in list(getattr(parent, attr))[: cfg.freeze_layers]:
                for p in layer.parameters():
                    p.requires_grad_(False)
        return model

    def student_inputs(self) -> tuple[list[str], bool]:
        """The inputs the training and dev batches carry (encode_data's) and whether the task's rows are text pairs."""
        return model_input_names(self.hf_config), self.train_data.texts[0][1] is not None

    def reference(self):
        """Dev logits loyalty is measured against at every evaluation: the teacher's (KD), or with
        --keep-layers those of --model as loaded before truncation when that is a classifier for
        the task (the truncation baseline); None otherwise."""
        if self.distiller is not None:
            ref, order = self.teacher, self.teacher_order
            self.reference_name = f"the teacher {self.teacher_name}"
        elif self.cfg.keep_layers is not None:
            try:
                ref, order = distill.load_teacher(self.cfg.model, self.spec, self.tokenizer, self.mapping,
                                                  self.cfg.max_seq_length, *self.student_inputs())
            except UsageError as e:  # a bare encoder (new head): nothing to be loyal to
                log(f"[finetune] no loyalty figure: {e}")
                return None
            self.reference_name = f"{self.cfg.model} before truncation"
        else:
            return None
        ref.to(self.acc.device)
        logits, _ = predict(ref, self.dev_loader, self.acc, inputs=model_input_names(ref))  # what KD's teacher reads
        return logits if order is None else logits[:, order.numpy()]

    # ================================================================== train
    def train(self):
        with self.progress() as bar:
            for batch in self.batches():
                labels = batch.pop("labels")
                out = self.model(**batch, labels=labels)
                loss = out.loss if self.distiller is None else self.distiller.loss(out.loss, out.logits, batch)
                self.optimizer_step(loss, soft=self.distiller.last_soft if self.distiller else None)

                last = self.advance(bar)
                stop = self.evaluate_every(last, weights=self.final_state_dict)
                if self.checkpoint_every(last) or stop:
                    break
        return self

    # ================================================================== save
    def final_state_dict(self) -> dict:
        """The weights an improving evaluation keeps: the whole model's."""
        return self.acc.unwrap_model(self.model).state_dict()

    def summary(self) -> dict:
        out = self.metrics()
        if self.distiller is not None:
            out["distill"]["teacher"] = self.teacher_name
        return out

    def save(self):
        self.write_output(lambda: self.acc.unwrap_model(self.model), self.run_config(), self.summary())
        return self


@dist.locks_output("cfg.output", protected=protected_inputs)  # held for the whole run, O.partial/ included
def run_finetune(cfg: C.FinetuneConfig):
    r = FinetuneRecipe(cfg).setup().train()
    if r.paused:
        say(f"[finetune] paused after step {r.step}: checkpoint in {r.work}; continue with --resume")
        return r
    r.save()
    print_table([(f"finetuned ({r.hf_config.num_hidden_layers} layers)", r.best_metrics)], r.spec.metrics)
    if r.best_loyalty:  # as compress prints its loyalty to the predecessor (metrics.json "loyalty" holds it too)
        say(f"loyalty to {r.reference_name}: {describe(r.best_loyalty)}")
    return r
