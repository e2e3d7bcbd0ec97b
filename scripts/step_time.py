#!/usr/bin/env python
"""Training step time: Theseus compress at p=0.5 vs plain fine-tuning of the predecessor, and
(--distill-alpha) Theseus with knowledge distillation: one extra no-grad predecessor forward per step.

Same model, batch and shapes; the steps are interleaved (A B A B ...) so machine drift hits
both; we report medians and the median of paired ratios. Each round draws the modules that run
their successor once: the Theseus and the Theseus + KD step of a round use the same draw (each
drew its own, so a paired ratio could compare a step with one successor module in the loop with
one with three).

    python scripts/step_time.py --model ../shared/models/bert-base-uncased --layers 12 --batch-size 8 --seq-len 128
    python scripts/step_time.py --model ~/.cache/theseus-models/all-MiniLM-L6-v2 --batch-size 32 --seq-len 64
    python scripts/step_time.py --model ~/.cache/theseus-models/all-MiniLM-L6-v2 --batch-size 32 --seq-len 64 --distill-alpha 0.5
"""
import contextlib
import argparse
import json
import statistics
import time

import torch

from theseus_deploy.hf import build_random_classifier, load_classifier
from theseus_deploy.modeling import TheseusModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", type=int, default=None, help="random init from a config folder with this depth")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--distill-alpha", type=float, default=None, help="also time Theseus + KD (compress --distill-alpha)")
    ap.add_argument("--distill-temperature", type=float, default=2.0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    def fresh():
        if a.layers is not None:
            return build_random_classifier(a.model, a.layers).train()
        return load_classifier(a.model).train()

    plain = fresh()
    theseus = TheseusModel(fresh(), None)
    theseus.train()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    opt_th = torch.optim.AdamW([p for p in theseus.parameters() if p.requires_grad], lr=1e-5)
    vocab = plain.config.vocab_size
    ids = torch.randint(1000, vocab - 1, (a.batch_size, a.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(a.batch_size, dtype=torch.long)}
    gen = torch.Generator().manual_seed(0)
    draw = []  # this round's replacement draws: the Theseus and Theseus + KD steps of a round share them

    def new_draw():
        while True:  # an all-predecessor batch trains nothing (and costs nothing): time real steps
            d = theseus.sample(a.p, gen)
            if any(d):
                draw[:] = d
                return

    def use_draw():
        for m, d in zip(theseus.modules_, draw):
            m.use_successor = d

    def step_plain():
        loss = plain(**batch).loss
        loss.backward()
        opt_plain.step()
        opt_plain.zero_grad()

    def step_theseus():
        use_draw()
        loss = theseus(**batch).loss
        loss.backward()
        opt_th.step()
        opt_th.zero_grad()

    steps = [("finetune", step_plain), ("theseus", step_theseus)]
    if a.distill_alpha is not None:
        from theseus_deploy.distill import Distiller, theseus_teacher

        distiller = Distiller(a.distill_alpha, a.distill_temperature, False,
                              theseus_teacher(theseus, contextlib.nullcontext))
        inputs = {k: v for k, v in batch.items() if k != "labels"}

        def step_theseus_kd():  # as a step of recipes/compress.py: student forward, teacher forward, combined loss
            use_draw()
            out = theseus(**batch)
            loss = distiller.loss(out.loss, out.logits, inputs)
            loss.backward()
            opt_th.step()
            opt_th.zero_grad()

        steps.append(("theseus_kd", step_theseus_kd))
    new_draw()
    for _, f in steps:  # warm-up
        f()
    times = {name: [] for name, _ in steps}
    for _ in range(a.reps):
        new_draw()  # so a paired ratio compares steps with the same successor modules in the loop
        for name, f in steps:
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    ratios = [t / f for t, f in zip(times["theseus"], times["finetune"])]
    out = {"model": a.model, "layers": plain.config.num_hidden_layers, "successor_layers": theseus.num_modules,
           "batch_size": a.batch_size, "seq_len": a.seq_len, "p": a.p, "reps": a.reps,
           "threads": torch.get_num_threads(),
           "finetune_step_s_median": statistics.median(times["finetune"]),
           "theseus_step_s_median": statistics.median(times["theseus"]),
           "theseus_over_finetune_median_ratio": statistics.median(ratios),
           "ratio_min_max": [min(ratios), max(ratios)]}
    if "theseus_kd" in times:
        kd = [k / t for k, t in zip(times["theseus_kd"], times["theseus"])]
        out.update({"theseus_kd_step_s_median": statistics.median(times["theseus_kd"]),
                    "kd_over_theseus_median_ratio": statistics.median(kd), "kd_ratio_min_max": [min(kd), max(kd)]})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
