"""The weight fingerprint streams tensor bytes and still matches the digest databases were built with."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from attribdb import models
from attribdb.models import fingerprint

from helpers import tiny_gpt2


def _fingerprint_with_host_copies(model: nn.Module) -> str:
    """The implementation existing databases were fingerprinted with: a CPU copy of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class _Odd(nn.Module):
    """Tensors the simple path would get wrong: transposed (non-contiguous), bfloat16, bool, empty."""

    def __init__(self):
        super().__init__()
        self.transposed = nn.Parameter(torch.randn(7, 5).T)
        self.bf16 = nn.Parameter(torch.randn(3, 4, dtype=torch.bfloat16))
        self.register_buffer("flags", torch.tensor([True, False, True]))
        self.register_buffer("empty", torch.zeros(0, 3))


def test_digest_equals_the_host_copy_implementation(monkeypatch):
    torch.manual_seed(0)
    for model in (tiny_gpt2().float(), tiny_gpt2().to(torch.bfloat16), _Odd()):
        assert fingerprint(model) == _fingerprint_with_host_copies(model)
    monkeypatch.setattr(models, "CHUNK_BYTES", 100)  # many chunks per tensor: the stream is what is hashed
    model = tiny_gpt2().float()
    assert fingerprint(model) == _fingerprint_with_host_copies(model)


def test_contiguous_cpu_tensors_are_hashed_in_place():
    weight = torch.randn(64, 64)
    chunk = next(models._byte_chunks(weight))
    assert chunk.ctypes.data == weight.data_ptr()  # the tensor's own memory, not a copy


def test_any_weight_change_changes_the_digest():
    model = tiny_gpt2().float()
    before = fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[3] += 1e-6
    assert fingerprint(model) != before
