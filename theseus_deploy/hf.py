"""Loading Hugging Face classifiers from a local folder or the hub, with clear errors.

Everything that touches a model folder (train, evaluate, export, bench) goes through here so
that "model not found" means the same thing, and says the same thing, everywhere.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from .arch import max_positions  # noqa: F401  (the position limit lives with the architecture)
from .errors import UsageError


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; ./x, /x, ~/x, a/b/c, or "dir/x" where dir exists are paths.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def check_model_source(name: str) -> str:
    """Return `name` if it is an existing folder or could be a hub id; else raise UsageError."""
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder has no config.json: {name}")
        return str(path)
    if _looks_like_path(name) or Path(name).exists():
        raise UsageError(f"model path does not exist: {name}")
    return name  # a hub id: from_pretrained will fetch it (or fail with a clear error below)


def load_config(name: str, **kwargs):
    from transformers import AutoConfig

    source = check_model_source(name)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UsageError(f"could not load model config '{name}': {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    check_architecture(name, config)
    return config


def check_architecture(name: str, config) -> None:
    """Every command handles encoder classifiers (BERT, RoBERTa, MPNet, ELECTRA, DistilBERT ...):
    an encoder-decoder (T5, BART) or decoder-only model is refused here, in one line, not deep
    inside training or the ONNX export."""
    kind = getattr(config, "model_type", None) or "unknown"
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"model '{name}' is an encoder-decoder ({kind}): theseus-deploy handles encoder "
                         "classifiers (BERT, RoBERTa, MPNet, ELECTRA, DistilBERT ...)")
    if getattr(config, "is_decoder", False) or any("CausalLM" in a for a in (getattr(config, "architectures", None) or ())):
        raise UsageError(f"model '{name}' is a decoder ({kind}): theseus-deploy handles encoder classifiers "
                         "(BERT, RoBERTa, MPNet, ELECTRA, DistilBERT ...)")


# What a tokenizer is saved as. A folder with none of them still "loads" in transformers 5 (a BERT
# config yields a 5-token vocabulary: every word becomes [UNK] and training happily learns nothing).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "merges.txt")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    source = check_model_source(name)
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"model folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])} ...): {name}; "
                         "save the tokenizer beside the model (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # the tokenizers library raises a bare Exception for a JSON file that is not a tokenizer
        if "No space left on device" in str(e):
            raise
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"could not load a tokenizer for '{name}': {msg}") from None
    if getattr(tokenizer, "pad_token", None) is None:
        # Batches are padded everywhere (training, evaluation, validation, serving): found at the first batch otherwise.
        raise UsageError(f"the tokenizer of '{name}' has no pad token: set one and save it "
                         "(tokenizer.pad_token = ...; tokenizer.save_pretrained)")
    return tokenizer


def check_tokenizer_fits(name: str, config, tokenizer) -> None:
    """Refuse a tokenizer with more ids than the model's embedding table (a config whose vocab_size
    is smaller): real text would index past it (random ids below vocab_size pass every check)."""
    n, vocab = len(tokenizer), getattr(config, "vocab_size", None)
    if vocab is not None and n > vocab:
        raise UsageError(f"model '{name}': its tokenizer has {n} tokens but config.json's vocab_size is {vocab}: "
                         f"ids {vocab}..{n - 1} would index past the embedding table")


def load_classifier(name: str, num_labels: int | None = None, **config_overrides):
    """Load `AutoModelForSequenceClassification` (fp32, eager-safe) from a folder or hub id.

    `num_labels` is only passed for fine-tuning a bare encoder (a new head is created); for an
    already fine-tuned model leave it None and check the label count with `check_num_labels`.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per load is noise in our logs
    config = load_config(name)
    # A head of another size (a 2-label classifier fine-tuned for regression ...) is replaced by a new one.
    new_head = num_labels is not None and num_labels != config.num_labels
    if num_labels is not None:
        config.num_labels = num_labels
    for k, v in config_overrides.items():
        setattr(config, k, v)
    verbosity = hf_logging.get_verbosity()
    # transformers logs a load report (a table of every missing/unexpected key, 22-58 lines on a
    # mismatched checkpoint) before we can say in one line what is wrong: check_loaded says it.
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            check_model_source(name), config=config, dtype=torch.float32, ignore_mismatched_sizes=new_head,
            output_loading_info=True)
    except Exception as e:  # OSError, ValueError, safetensors' SafetensorError (truncated / garbled file) ...
        if "No space left on device" in str(e):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"could not load model '{name}': {msg}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loaded(name, model, info)
    return model


def _is_encoder_key(key: str, prefix: str) -> bool:
    """Encoder weights (embeddings, layers): not the pooler, not a task head (classifier, cls., lm_head)."""
    k = key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key
    if k.startswith("pooler.") or ".pooler." in k or k.endswith("_ids"):  # *_ids: buffers (position_ids), not weights
        return False
    return any(part in ("embeddings", "encoder", "layer", "layers", "transformer") for part in k.split(".")[:-1])


def check_loaded(name: str, model, info: dict) -> None:
    """Refuse a checkpoint whose encoder weights did not load by name (transformers re-initialises
    them silently and training 'works' on noise), and weights that are not finite."""
    prefix = getattr(model, "base_model_prefix", "")
    missing = [k for k in info.get("missing_keys", ()) if _is_encoder_key(k, prefix)]
    unexpected = [k for k in info.get("unexpected_keys", ()) if _is_encoder_key(k, prefix)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} encoder weights missing (e.g. {sorted(missing)[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[0]})")
        raise UsageError(f"model '{name}': the checkpoint does not match its config.json: {', '.join(parts)}")
    import torch

    bad = [n for n, t in model.named_parameters() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise UsageError(f"model '{name}' has non-finite weights (NaN/inf) in {len(bad)} tensors, e.g. {bad[0]}")


def check_fine_tuned(name: str, config, role: str, hint: str) -> None:
    """Refuse a model that is not a fine-tuned classifier wherever its own predictions are read
    (compress, evaluate, export, sweep, bench, serve, a teacher, a loyalty reference): loaded as one,
    a bare encoder gets a new random head."""
    if not any(str(a).endswith("ForSequenceClassification") for a in (config.architectures or [])):
        raise UsageError(f"{role} '{name}' is not a fine-tuned classifier (architectures: "
                         f"{', '.join(config.architectures or ['none'])}): {hint}")


def check_max_seq_length(config, max_seq_length: int, flag: str = "--max-seq-length") -> None:
    """Refuse a sequence length above the position table before any training (it crashes later otherwise)."""
    limit = max_positions(config)
    if limit is not None and max_seq_length > limit:
        raise UsageError(f"{flag} {max_seq_length} exceeds the model's position limit ({limit} tokens)")


def model_input_names(model_or_config) -> list[str]:
    """The inputs a classifier takes, in export order.

    `token_type_ids` only where the model has a segment embedding with more than one type
    (BERT, ELECTRA): RoBERTa keeps a 1-row table and MPNet has none.
    """
    config = getattr(model_or_config, "config", model_or_config)
    names = ["input_ids", "attention_mask"]
    if getattr(config, "type_vocab_size", 0) and config.type_vocab_size > 1:
        if hasattr(model_or_config, "forward"):
            if "token_type_ids" not in inspect.signature(model_or_config.forward).parameters:
                return names
        names.append("token_type_ids")
    return names


def build_random_classifier(config_dir: str, num_layers: int | None = None, num_labels: int = 2, seed: int = 0):
    """A randomly initialised classifier from a config folder (latency work needs no weights)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = load_config(config_dir)
    if num_layers is not None:
        if num_layers < 1:
            raise UsageError(f"--layers must be at least 1, got {num_layers}")
        config.num_hidden_layers = num_layers
    config.num_labels = num_labels
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()
