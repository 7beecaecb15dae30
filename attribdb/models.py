"""Load a causal LM and its tokenizer from a local folder, and fingerprint its weights.

Nothing is fetched from a hub: a path that is not a local model folder is an
error.  The fingerprint (a hash of every weight) is what ties a database to
the exact model that produced its gradients.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from attribdb.errors import ConfigError

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                "bfloat16": torch.bfloat16, "float16": torch.float16}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None) picks CUDA when present; anything else is taken as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return resolved


def deterministic_on(device: torch.device) -> None:
    """On CUDA, kernels that give the same bits every run: a resumed build must store exactly the
    rows an uninterrupted one does, and atomic-add reductions (index_add_, scatter_add_, embedding
    backward) sum in a different order each run.  cuBLAS needs its workspace fixed for that, before
    its first use; an op with no deterministic kernel warns rather than fails."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def quiet_transformers() -> None:
    """transformers' config notices and its 'Loading weights' bar on every load are noise on a user's
    stderr: attribdb reports its own progress and turns every problem it can foresee into an error."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a local Hugging Face folder, in eval mode, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{path} is not a local model folder (no config.json); "
                          "attribdb never downloads models: give the folder written by save_pretrained")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one there "
                          "with tokenizer.save_pretrained")
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the model in {path}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device).eval(), tokenizer


def context_of_folder(path: str | Path) -> int | None:
    """The positions the model in a local folder has (None: unlimited or not stated), from its config
    alone, so that a new database's default sequence length can fit the model before it loads."""
    from transformers import AutoConfig

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None  # loading the model says what is wrong with the folder
    return getattr(config, "max_position_embeddings", None)


def check_context(model: nn.Module, max_length: int) -> None:
    """Refuse sequences longer than the model's positions before any work (it would fail mid-build)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and max_length > context:
        raise ConfigError(f"max-length {max_length} exceeds the model's context of {context} positions; "
                          f"give --max-length {context} or less")


CHUNK_BYTES = 1 << 26  # a device tensor crosses to the host this many bytes at a time


def _byte_chunks(tensor: torch.Tensor):
    """The tensor's bytes in memory order, without a host copy of the whole tensor.

    A contiguous CPU tensor is hashed from its own memory; a device tensor
    streams to the host in chunks of :data:`CHUNK_BYTES`.
    """
    raw = tensor.detach().reshape(-1).view(torch.uint8)  # a view when contiguous
    for start in range(0, raw.numel(), CHUNK_BYTES):
        yield raw[start:start + CHUNK_BYTES].cpu().numpy()  # .cpu() of a CPU tensor is the tensor itself


def fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer's name, dtype, shape and bytes (in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        for chunk in _byte_chunks(tensor):
            digest.update(chunk)
    return digest.hexdigest()


def compute_dtype(name: str) -> torch.dtype:
    """Gradients of a half-precision model are preconditioned in float32."""
    dtype = torch_dtype(name)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
