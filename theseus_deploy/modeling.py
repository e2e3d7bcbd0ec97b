"""BERT-of-Theseus (Xu et al., EMNLP 2020) around any Hugging Face encoder classifier.

The predecessor's list of L layers is split into n consecutive blocks (sizes differ by at
most one when n does not divide L). Each block i gets a successor: one layer, initialised as
a copy of a predecessor layer (by default the bottom n layers, the paper's choice). In
training, each block independently runs its successor with probability p (one Bernoulli draw
per module per batch); in eval mode only the successors run, so the evaluated model *is* the
compact model. `to_successor()` turns it into a plain model with `num_hidden_layers = n`.

We swap the encoder's ModuleList for a list of `TheseusModule`s and let the architecture's own
encoder loop call them with whatever arguments it passes (attention mask, MPNet's relative
position bias, ...), so nothing of the encoder forward is re-implemented here.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .errors import UsageError

from .arch import LAYER_PATHS, arch


def find_layers(model: nn.Module) -> tuple[nn.Module, str, str]:
    """Return (parent module, attribute name, state-dict prefix) of the encoder's layer list."""
    base = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", "")
    if base is model:
        prefix = ""
    known = arch(getattr(getattr(model, "config", None), "model_type", None))
    for path in ((known.layers,) if known else ()) + LAYER_PATHS:
        *parents, attr = path.split(".")
        parent = base
        for p in parents:
            parent = getattr(parent, p, None)
        if isinstance(getattr(parent, attr, None), nn.ModuleList):
            full = ".".join(x for x in (prefix, path) if x)
            return parent, attr, full
    raise UsageError(
        f"unsupported model {type(model).__name__}: no list of encoder layers at "
        + ", ".join(f"base_model.{p}" for p in LAYER_PATHS)
    )


def split_blocks(num_layers: int, num_modules: int) -> list[list[int]]:
    """Consecutive blocks whose sizes differ by at most one (larger blocks first)."""
    if not 1 <= num_modules <= num_layers:
        raise UsageError(f"successor layers must be between 1 and the predecessor's {num_layers} layers, got {num_modules}")
    q, r = divmod(num_layers, num_modules)
    blocks, start = [], 0
    for i in range(num_modules):
        size = q + (1 if i < r else 0)
        blocks.append(list(range(start, start + size)))
        start += size
    return blocks


def init_indices(num_layers: int, num_modules: int, init: str = "bottom") -> list[int]:
    """Which predecessor layer each successor layer starts as."""
    if init == "bottom":
        return list(range(num_modules))
    if init == "top":
        return list(range(num_layers - num_modules, num_layers))
    if init == "uniform":
        return [blk[0] for blk in split_blocks(num_layers, num_modules)]
    raise UsageError(f"unknown --init '{init}' (bottom, top, uniform)")


class TheseusModule(nn.Module):
    """One predecessor block and the single successor layer that may replace it."""

    def __init__(self, predecessor: list[nn.Module], successor: nn.Module):
        super().__init__()
        self.predecessor = nn.ModuleList(predecessor)
        self.successor = successor
        self.use_successor = False   # this batch's Bernoulli draw
        self.force: str | None = None  # "predecessor" / "successor": override (evaluation, tests)

    def forward(self, hidden_states, *args, **kwargs):
        mode = self.force or ("successor" if (self.use_successor or not self.training) else "predecessor")
        if mode == "successor":
            return self.successor(hidden_states, *args, **kwargs)
        out = None
        for layer in self.predecessor:
            out = layer(hidden_states, *args, **kwargs)
            # BERT layers return a tensor in transformers 5; MPNet still returns a tuple.
            hidden_states = out[0] if isinstance(out, tuple) else out
        return out


class TheseusModel(nn.Module):
    """A predecessor classifier whose layer blocks can be replaced by successor layers."""

    def __init__(self, predecessor: nn.Module, successor_layers: int | None = None, init: str = "bottom"):
        super().__init__()
        parent, attr, self.layer_path = find_layers(predecessor)
        layers = list(getattr(parent, attr))
        num_layers = len(layers)
        n = successor_layers if successor_layers is not None else (num_layers + 1) // 2
        self.blocks = split_blocks(num_layers, n)
        self.init_from = init_indices(num_layers, n, init)
        self.predecessor_layers = num_layers
        modules = [
            TheseusModule([layers[j] for j in block], copy.deepcopy(layers[self.init_from[i]]))
            for i, block in enumerate(self.blocks)
        ]
        setattr(parent, attr, nn.ModuleList(modules))
        self.model = predecessor
        self.modules_ = modules  # plain list: no second registration
        self.freeze_predecessor()

    # ------------------------------------------------------------------ parameters
    @property
    def num_modules(self) -> int:
        return len(self.modules_)

    def successor_parameters(self):
        return [p for m in self.modules_ for p in m.successor.parameters()]

    def head_parameters(self):
        """Pooler and classifier: everything outside the base model, plus its pooler."""
        base = getattr(self.model, "base_model", self.model)
        base_ids = {id(p) for p in base.parameters()}
        head = [p for p in self.model.parameters() if id(p) not in base_ids]
        pooler = getattr(base, "pooler", None)
        if isinstance(pooler, nn.Module):
            head += list(pooler.parameters())
        return head

    def freeze_predecessor(self):
        """Embeddings, predecessor layers, pooler and classifier frozen; successor layers trainable."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.successor_parameters():
            p.requires_grad_(True)

    def unfreeze_head(self):
        for p in self.head_parameters():
            p.requires_grad_(True)

    def embedding_parameters(self):
        """The base model's embeddings (token, position, segment tables and their LayerNorm): shared
        by predecessor and successor, frozen with the predecessor unless --unfreeze-embeddings."""
        base = getattr(self.model, "base_model", self.model)
        emb = getattr(base, "embeddings", None)
        return list(emb.parameters()) if isinstance(emb, nn.Module) else []

    def unfreeze_embeddings(self):
        for p in self.embedding_parameters():
            p.requires_grad_(True)

    # ------------------------------------------------------------------ replacement
    def sample(self, p: float, generator: torch.Generator | None = None) -> list[bool]:
        """One Bernoulli(p) draw per module for the next batch."""
        draws = (torch.rand(self.num_modules, generator=generator) < p).tolist()
        for m, d in zip(self.modules_, draws):
            m.use_successor = bool(d)
        return draws

    def force(self, mode: str | None):
        """'predecessor', 'successor' or None (normal: draws in training, successor in eval)."""
        for m in self.modules_:
            m.force = mode

    def forward(self, **inputs):
        return self.model(**inputs)

    # ------------------------------------------------------------------ export
    def successor_state_dict(self) -> dict:
        """State dict of the plain n-layer model (predecessor blocks dropped)."""
        pat = re.compile(re.escape(self.layer_path) + r"\.(\d+)\.(predecessor|successor)\.(.*)")
        out = {}
        for k, v in self.model.state_dict().items():
            m = pat.fullmatch(k)
            if m is None:
                out[k] = v
            elif m.group(2) == "successor":
                out[f"{self.layer_path}.{m.group(1)}.{m.group(3)}"] = v
        return out

    def to_successor(self) -> nn.Module:
        """A plain `*ForSequenceClassification` with n layers and the successor's weights."""
        config = copy.deepcopy(self.model.config)
        config.num_hidden_layers = self.num_modules
        with torch.device("meta"):
            succ = type(self.model)(config)
        succ.load_state_dict({k: v.detach().clone() for k, v in self.successor_state_dict().items()},
                             strict=True, assign=True)
        # Non-persistent buffers (position ids ...) are not in the state dict: rebuild them.
        _materialise_buffers(succ, self.model)
        return succ.eval()


def truncate(model: nn.Module, keep_layers: int) -> nn.Module:
    """The bottom `keep_layers` layers of `model`, as a plain trainable model (`finetune
    --keep-layers`, the truncation baseline): the successor of a Theseus wrapper whose modules
    start as the bottom layers, taken before any training."""
    num_layers = model.config.num_hidden_layers
    if not 1 <= keep_layers <= num_layers:
        raise UsageError(f"--keep-layers must be between 1 and the model's {num_layers} layers, got {keep_layers}")
    out = TheseusModel(model, keep_layers, init="bottom").to_successor()
    for p in out.parameters():
        p.requires_grad_(True)
    return out.train()


def _materialise_buffers(target: nn.Module, source: nn.Module):
    src = dict(source.named_buffers())
    for name, buf in list(target.named_buffers()):
        if buf.is_meta:
            key = re.sub(r"\.(\d+)\.", ".\\1.successor.", name, count=1) if name not in src else name
            value = src.get(key)
            if value is None:
                raise RuntimeError(f"cannot rebuild buffer {name}")
            mod_name, _, attr = name.rpartition(".")
            mod = target.get_submodule(mod_name) if mod_name else target
            mod._buffers[attr] = value.detach().clone()
