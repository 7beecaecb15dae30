"""Module tracking: capture what EK-FAC needs from each tracked linear layer.

For a tracked module with pre-activation ``s_t = W a_t`` the gradient of a
sequence's loss is ``G = Σ_t δ_t a_tᵀ`` with ``δ_t = ∂loss/∂s_t``.  A forward
hook keeps the inputs ``a`` (with a column of ones appended for the bias) and
a tensor hook on the output keeps ``δ``.  Everything downstream (covariances,
per-sequence gradients, per-token contributions) is a contraction of these two
tensors, so one forward and one backward pass serve a whole batch.

Gradients are always laid out ``(dout, din [+1])`` like ``nn.Linear.weight``;
Hugging Face's GPT-2 ``Conv1D`` stores its weight transposed
(``din × dout``), which only matters when mapping back to parameters.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from attribdb.errors import ConfigError

try:  # transformers is optional for plain torch models
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - exercised only without transformers
    Conv1D = ()

TRACKABLE_TYPES = (nn.Linear,) + ((Conv1D,) if Conv1D else ())

# The default for transformer LMs: every linear map inside the blocks, which
# leaves out embeddings and the LM head (as the paper does).
DEFAULT_LM_PATTERNS = ("*.h.*", "*.layers.*", "*.blocks.*", "*.block.*")


@dataclass(frozen=True)
class TrackedModule:
    """A tracked layer's identity and shape."""

    name: str
    d_in: int  # including the bias column when the layer has a bias
    d_out: int
    has_bias: bool


def _layer_shape(module: nn.Module) -> tuple[int, int, bool]:
    """Return (d_in without bias, d_out, has_bias) for a trackable module."""
    if isinstance(module, nn.Linear):
        d_in, d_out = module.in_features, module.out_features
    else:  # Conv1D: weight is (d_in, d_out)
        d_in, d_out = module.weight.shape
    return d_in, d_out, module.bias is not None


def find_tracked_modules(model: nn.Module, patterns: tuple[str, ...] | None = None) -> list[TrackedModule]:
    """Trackable modules whose names match any fnmatch pattern, in model order.

    ``patterns=None`` tracks every trackable module (for small generic models);
    pass :data:`DEFAULT_LM_PATTERNS` for transformer blocks only.
    """
    tracked = []
    for name, module in model.named_modules():
        if not isinstance(module, TRACKABLE_TYPES):
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        d_in, d_out, has_bias = _layer_shape(module)
        tracked.append(TrackedModule(name, d_in + int(has_bias), d_out, has_bias))
    if not tracked:
        raise ConfigError(
            f"no nn.Linear or Conv1D module matches the patterns {list(patterns or ['*'])}; "
            "pass module patterns that name the layers to track"
        )
    return tracked


@dataclass
class Capture:
    """Inputs and output gradients of one module for one batch.

    ``acts``: (B, T, d_in[+1]); ``grads_out``: (B, T, d_out).  Inputs of shape
    (B·T, d), which layers of OPT and of MoE shared experts see after the model
    flattens its tokens, are reshaped back to (B, T, d); other (B, d) inputs are
    stored as T = 1.  Masked (padding) positions are zeroed in both.
    """

    acts: torch.Tensor | None = None
    output: torch.Tensor | None = None  # kept until backward(), then dropped
    grads_out: torch.Tensor | None = None


@dataclass
class ModuleTracker:
    """Context manager that hooks the tracked modules of a model.

    Use: ``tracker.reset(mask)``, forward pass, ``tracker.backward(loss)``,
    then read ``tracker.captures``.  ``backward`` asks autograd only for the
    gradients of the tracked outputs, so no parameter ``.grad`` is computed or
    accumulated.  ``mask`` (B, T) zeroes padding positions so they contribute
    nothing to covariances or gradients.
    """

    model: nn.Module
    modules: list[TrackedModule]
    dtype: torch.dtype | None = None  # cast captures (e.g. float64 for exact tests)
    mask: torch.Tensor | None = None
    captures: dict[str, Capture] = field(default_factory=dict)
    _handles: list = field(default_factory=list)
    _saved_requires_grad: list = field(default_factory=list)

    def __enter__(self) -> "ModuleTracker":
        by_name = dict(self.model.named_modules())
        for tracked in self.modules:
            module = by_name[tracked.name]
            self._handles.append(module.register_forward_hook(self._forward_hook(tracked)))
            for param in module.parameters(recurse=False):
                # a frozen model still needs its tracked outputs in the graph
                self._saved_requires_grad.append((param, param.requires_grad))
                param.requires_grad_(True)
        self.reset()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, requires_grad in self._saved_requires_grad:
            param.requires_grad_(requires_grad)
        self._saved_requires_grad.clear()
        self.captures = {}

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Forget the previous batch's captures before the next forward pass."""
        self.captures = {m.name: Capture() for m in self.modules}
        self.mask = mask

    def backward(self, loss: torch.Tensor) -> dict[str, Capture]:
        """Fill ``grads_out`` of every module from the scalar ``loss``."""
        names = [m.name for m in self.modules]
        missing = [n for n in names if self.captures[n].output is None]
        if missing:
            raise ConfigError(f"module {missing[0]} did not run in the forward pass")
        outputs = [self.captures[n].output for n in names]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is None:
                raise ConfigError(
                    f"module {name} got no gradient: it is not on the path from the inputs to the loss"
                )
            capture = self.captures[name]
            capture.grads_out = self._captured(grad)
            capture.output = None
        return self.captures

    def _captured(self, x: torch.Tensor, bias_column: bool = False) -> torch.Tensor:
        """A detached (B, T, d) copy of ``x`` in the capture dtype with padded tokens zeroed, and a
        trailing column of ones (zero on padding) when the module has a bias.  Written in one pass:
        a GPT-2-small batch captures about a gigabyte, and a cast, a concatenation and a masking as
        three passes cost a tenth of the forward and backward."""
        x = x.detach()
        if x.dim() == 2:
            flattened_tokens = self.mask is not None and x.shape[0] == self.mask.numel()
            x = x.reshape(*self.mask.shape, x.shape[-1]) if flattened_tokens else x.unsqueeze(1)
        dtype = self.dtype or x.dtype
        if self.mask is None and not bias_column:
            return x.to(dtype)
        out = torch.empty(*x.shape[:-1], x.shape[-1] + bias_column, dtype=dtype, device=x.device)
        body, bias = out[..., :x.shape[-1]], out[..., x.shape[-1]:]
        if self.mask is None:
            body.copy_(x)
            bias.fill_(1.0)
        else:
            mask = self.mask.to(device=x.device, dtype=dtype).unsqueeze(-1)
            torch.mul(x, mask, out=body)
            bias.copy_(mask.expand_as(bias))
        return out

    def _forward_hook(self, tracked: TrackedModule):
        def hook(module, inputs, output):
            capture = self.captures[tracked.name]
            if capture.acts is not None:
                raise ConfigError(
                    f"module {tracked.name} ran twice in one forward pass; shared layers cannot be tracked"
                )
            capture.acts = self._captured(inputs[0], bias_column=tracked.has_bias)
            capture.output = output

        return hook


def per_sequence_gradients(capture: Capture) -> torch.Tensor:
    """G_m = Σ_t δ_t a_tᵀ for every sequence of the batch: (B, d_out, d_in)."""
    return torch.einsum("bto,bti->boi", capture.grads_out, capture.acts)
