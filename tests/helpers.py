"""Small models and independent reference computations shared by the tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from attribdb.tasks import ClassificationTask, collate_sequences


def tiny_mlp(seed: int = 0, d_in: int = 4, hidden: int = 5, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()


def classification_data(n: int, seed: int = 1, d_in: int = 4, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, d_in, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, classes, (n,), generator=generator)
    return inputs, targets


def batches_of(inputs, targets, size):
    return [(inputs[i:i + size], targets[i:i + size]) for i in range(0, len(inputs), size)]


def per_example_linear_grads(model: nn.Module, inputs, targets) -> dict[str, torch.Tensor]:
    """Per-example (d_out, d_in + 1) gradients of the cross-entropy, by torch.func — the reference."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        logits = functional_call(model, p, (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(logits, y.unsqueeze(0), reduction="sum")

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[name] = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"].unsqueeze(-1)], dim=-1)
    return out


def explicit_fisher(per_example: torch.Tensor) -> torch.Tensor:
    """E_m[vec(G_m) vec(G_m)ᵀ] (row-major vec) from (N, d_out, d_in) gradients."""
    flat = per_example.reshape(per_example.shape[0], -1)
    return flat.T @ flat / flat.shape[0]


def tiny_gpt2(seed: int = 0, vocab: int = 32, layers: int = 2, width: int = 16):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=width, n_layer=layers, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double().eval()


def token_lists(n: int, seed: int = 2, vocab: int = 32, min_len: int = 3, max_len: int = 9) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    return [torch.randint(0, vocab, (int(k),), generator=generator).tolist() for k in lengths]


def lm_batches(tokens: list[list[int]], size: int, score_from=None):
    return [collate_sequences(tokens[i:i + size], pad_id=0,
                              score_from=None if score_from is None else score_from[i:i + size])
            for i in range(0, len(tokens), size)]


def gpt2_reference_grads(model, token_ids: list[int], score_from: int = 1) -> dict[str, torch.Tensor]:
    """(d_out, d_in + 1) gradients of one unpadded sequence by plain autograd; Conv1D weight is (d_in, d_out)."""
    from attribdb.tasks import CausalLMTask

    batch = collate_sequences([token_ids], pad_id=0, score_from=[score_from])
    model.zero_grad(set_to_none=True)
    CausalLMTask().train_loss(model, batch).backward()
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D" and ".h." in f".{name}":
            out[name] = torch.cat([module.weight.grad.T, module.bias.grad.unsqueeze(-1)], dim=-1).clone()
    model.zero_grad(set_to_none=True)
    return out


CLASSIFICATION = ClassificationTask()
