"""The recipes: `finetune` (gives the predecessor), `compress` (BERT-of-Theseus) and `evaluate`.

One file per recipe, read top to bottom (setup -> model -> optimizer -> loop -> save):
finetune.py, compress.py, evaluate.py. What they share is in common.py (scoring a model over a
loader, progress lines, the result table) and loop.py (a training run's state: data, accelerator,
optimizer, the step bookkeeping, evaluation that keeps the best weights, checkpoints, the output
folder). A recipe imports those two, never another recipe (tests/test_layout.py).

Distribution and mixed precision come from `accelerate` (`accelerate launch -m theseus_deploy
compress ...`, or torchrun / mpirun); the few decisions it cannot make for us (which rows each rank
evaluates and trains on, every rank's RNG in checkpoints, who holds the output lock) are in dist.py
(docs/distributed.md).
"""
