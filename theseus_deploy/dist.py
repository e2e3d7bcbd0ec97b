"""Several processes (`accelerate launch`, `torchrun`, mpirun, SLURM + a launcher): the few
decisions the recipes (recipes/) cannot leave to `accelerate` alone (docs/distributed.md).

What went wrong when everything was left to `accelerate.prepare` (measured with gloo, 2 CPU processes):
- the dev loader was sharded with accelerate's even-batches padding: a dev set that is not a
  multiple of the eval batch crashed gloo at the first evaluation (ranks gathered tensors of
  different sizes: 44 rows, eval batch 8, "Received data size doesn't match"), and a 192-row dev
  set came back as 256 rows (padding duplicates scored);
- only rank 0's RNG was checkpointed and every rank restored it (resumed runs drifted 2.2e-3);
- the output lock read `RANK` before accelerate had set it: under mpirun (`OMPI_COMM_WORLD_RANK`)
  both processes raced for the lock, rank 1 exited 2 and rank 0 hung.

So: evaluation here gives every rank whole batches of the one-process batch list (batch i to rank
i mod N) and gathers the logits in order, so N processes score exactly the rows, in the batches,
one process scores (so the same logits at the same thread count); training batches are dealt the same way,
with the epoch's batch list padded to a multiple of N from its own start (what accelerate's
even_batches does), so a resumed run deals exactly what an uninterrupted one dealt; "main
process" is accelerate's process index once its state exists (every launcher accelerate supports),
and before that the first of the launchers' rank variables accelerate itself reads.
"""
from __future__ import annotations

import contextlib
import functools
import random
import sys

import numpy as np

from .errors import UsageError
from .io import RANK_VARS, _rank, argument_getter, env_int, output_lock, protected_getter

# The variables accelerate reads (accelerate.utils.environment.get_cpu_distributed_information):
# torchrun / accelerate launch, Intel MPI / MPICH (PMI_*), Open MPI, MVAPICH. SLURM's SLURM_PROCID
# is not one: under SLURM a launcher started by srun (torchrun, accelerate launch) sets RANK; a
# plain `srun -n 2 python ...` starts two independent one-process runs, which the lock keeps apart.
SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
__all__ = ["RANK_VARS", "SIZE_VARS", "rank", "world_size", "is_main", "state", "check_world", "gather", "broadcast",
           "mean", "deal", "rng_state", "set_rng_state", "locks_output"]


def _initialized() -> bool:
    if "torch" not in sys.modules:  # a command that never imported torch is not distributed
        return False
    import torch.distributed as td

    return td.is_available() and td.is_initialized()


def rank() -> int:
    """This process's global rank: the process group's once it exists, else the launcher's variable."""
    return _rank()


def world_size() -> int:
    if _initialized():
        import torch.distributed as td

        return td.get_world_size()
    return 1


def is_main() -> bool:
    return rank() == 0


def state():
    """accelerate's PartialState, created now: it starts the process group for any launcher accelerate
    supports. A launcher that asked for several processes while accelerate found nothing to distribute
    over (torchrun on a CPU-only machine without ACCELERATE_USE_CPU) would give N independent runs of
    one process each on one output: refused."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    st = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world(st.num_processes)
    return st


def check_world(num_processes: int) -> None:
    """UsageError when the launcher's world size (WORLD_SIZE, PMI_SIZE, ...) says several processes
    and accelerate's state has one."""
    asked = env_int(SIZE_VARS, 1)
    if asked > 1 and num_processes == 1:
        raise UsageError(f"launched as {asked} processes but accelerate found no devices to spread them over "
                         "(no GPU): on CPU set ACCELERATE_USE_CPU=true for the gloo backend (docs/distributed.md)")


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (a picklable object; one collective)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as td

    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def mean(value: float) -> float:
    """The mean of `value` over ranks (one float64 all-reduce on the process's device; the value
    itself with one process)."""
    if world_size() == 1:
        return value
    import torch
    import torch.distributed as td
    from accelerate import PartialState

    t = torch.tensor([float(value)], dtype=torch.float64, device=PartialState().device)
    td.all_reduce(t)
    return t.item() / td.get_world_size()


def deal(batches: list, world: int, rank_: int, padded: bool) -> list:
    """This rank's batches of a batch list: batch i goes to rank i mod `world`. `padded`: the list is
    first padded to a multiple of `world` with batches from its own start (training: every rank
    takes part in every optimizer step); unpadded for evaluation (no row twice)."""
    batches = list(batches)
    if padded and batches and len(batches) % world:
        need = world - len(batches) % world
        batches += [batches[i % len(batches)] for i in range(need)]
    return batches[rank_::world]


def rng_state() -> dict:
    """This process's global RNG states (torch CPU, CUDA, numpy, python), as tensors and plain types
    so that a checkpoint holding them loads with torch.load(weights_only=True)."""
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": list(random.getstate()[1]) + [random.getstate()[2]]}


def set_rng_state(s: dict) -> None:
    import torch

    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    *internal, gauss = s["python"]
    random.setstate((3, tuple(internal), gauss))


def locks_output(arg: str = "cfg.output", protected=None):
    """Decorator (io.locks_output for commands that may run under a launcher): the process group is
    started first, then only the main process takes the output lock, and every rank learns whether
    it got it, so a refused run stops on every rank with the same one-line error (before: the rank
    came from RANK, unset under mpirun until accelerate ran, and both ranks raced for the lock)."""
    def decorate(fn):
        get, inputs = argument_getter(fn, arg), protected_getter(fn, arg, protected)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            value = get(args, kwargs)
            if not value:
                return fn(*args, **kwargs)
            st = state()
            if st.num_processes == 1:
                with output_lock(value, protected=inputs(args, kwargs)):
                    return fn(*args, **kwargs)
            with contextlib.ExitStack() as stack:
                refused = None
                if st.is_main_process:
                    try:
                        stack.enter_context(output_lock(value, protected=inputs(args, kwargs)))
                    except UsageError as e:
                        refused = str(e)
                refused = broadcast(refused)
                if refused:
                    raise UsageError(refused)
                return fn(*args, **kwargs)

        return wrapper

    return decorate
