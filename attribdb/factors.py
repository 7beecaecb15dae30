"""Curvature factors: the per-module approximation of the Fisher and its inverse.

Every strategy approximates a module's Fisher ``F = E_m[vec(G_m) vec(G_m)ᵀ]``
as ``Q diag(D) Qᵀ`` with ``Q = Q_S ⊗ Q_A`` (or the identity basis):

=========  =========================  ====================================
strategy   basis Q                    diagonal D
=========  =========================  ====================================
identity   identity                   none: plain gradient dot products
diagonal   identity                   E_m[G_m ∘ G_m]
kfac       eigvecs of S and A         eigvals(S) ⊗ eigvals(A)
ekfac      eigvecs of S and A         E_m[(Q_Sᵀ G_m Q_A) ∘ (Q_Sᵀ G_m Q_A)]
=========  =========================  ====================================

So one small class, :class:`ModuleFactors`, preconditions for all four: rotate
into the basis, divide by ``sqrt(D + λ)`` (the symmetric half of the inverse,
so a score is a plain inner product of two preconditioned gradients).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from attribdb.errors import ConfigError, StoreError
from attribdb.tracking import Capture, TrackedModule

FACTORS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Strategy:
    """A strategy is fixed by two choices: which basis, and whether D is measured."""

    name: str
    uses_eigenbasis: bool  # rotate into the eigenvectors of the K-FAC factors
    measures_diagonal: bool  # a pass over per-sequence gradients estimates D


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("identity", uses_eigenbasis=False, measures_diagonal=False),
        Strategy("diagonal", uses_eigenbasis=False, measures_diagonal=True),
        Strategy("kfac", uses_eigenbasis=True, measures_diagonal=False),
        Strategy("ekfac", uses_eigenbasis=True, measures_diagonal=True),
    )
}


# What the fit's arithmetic runs in.  float32: every product, as kronfluence's default (scores equal
# its own to float error).  bfloat16: the fit's forward and backward passes under bfloat16 autocast and
# the eigenvalue correction's rotations in bfloat16, as kronfluence's ``amp_dtype`` and
# ``per_sample_gradient_dtype`` options do, and the eigendecompositions in float32; covariances are
# still summed from float32 captures in float32.  It takes 0.6 of the float32 fit's time on a CPU with
# bfloat16 units (tools/benchmarks/bench_build.py) at the fidelity tools/evaluations/eval_fit_precision.py measures.
FIT_PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class FactorConfig:
    """How factors are fitted; saved next to the factors they produce."""

    strategy: str = "ekfac"  # identity | diagonal | kfac | ekfac
    fisher: str = "true"  # "true": labels sampled from the model; "empirical": the data's labels
    damping_factor: float = 0.1  # λ = damping_factor × mean(D), per module
    damping: float | None = None  # an absolute λ for every module (overrides damping_factor)
    seed: int = 0  # seeds the label sampling of the true Fisher
    precision: str = "float32"  # float32 | bfloat16: see FIT_PRECISIONS

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.precision not in FIT_PRECISIONS:
            raise ConfigError(f"unknown fit precision {self.precision!r}; choose one of {', '.join(FIT_PRECISIONS)}")
        if self.fisher not in ("true", "empirical"):
            raise ConfigError(f"fisher must be 'true' or 'empirical', not {self.fisher!r}")
        for name, value in (("damping-factor", self.damping_factor), ("damping", self.damping)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number, 0 or more, not {value}")

    @property
    def kind(self) -> Strategy:
        return STRATEGIES[self.strategy]


@dataclass
class ModuleFactors:
    """One module's curvature: basis (or identity), diagonal D and damping λ."""

    eigvecs_out: torch.Tensor | None  # Q_S (d_out, d_out); None = identity basis
    eigvecs_in: torch.Tensor | None  # Q_A (d_in, d_in)
    diagonal: torch.Tensor | None  # D (d_out, d_in); None = no preconditioning
    damping: float

    def to(self, device=None, dtype=None) -> "ModuleFactors":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return ModuleFactors(move(self.eigvecs_out), move(self.eigvecs_in), move(self.diagonal), self.damping)

    def rotate(self, grads: torch.Tensor) -> torch.Tensor:
        """Q_Sᵀ G Q_A for (..., d_out, d_in) gradients."""
        if self.eigvecs_out is None:
            return grads
        return self.eigvecs_out.T @ grads @ self.eigvecs_in

    def unrotate(self, rotated: torch.Tensor) -> torch.Tensor:
        if self.eigvecs_out is None:
            return rotated
        return self.eigvecs_out @ rotated @ self.eigvecs_in.T

    def rotated_tokens(self, capture: Capture) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's δ and a in the eigenbases, (B, T, d_out) and (B, T, d_in): a per-sequence
        gradient rotates as ``Q_Sᵀ G Q_A = Σ_t (Q_Sᵀ δ_t)(Q_Aᵀ a_t)ᵀ``, cheaper than rotating G when T < d."""
        grads_out, acts = capture.grads_out, capture.acts
        if self.eigvecs_out is not None:
            grads_out = grads_out @ self.eigvecs_out.to(grads_out.dtype)
            acts = acts @ self.eigvecs_in.to(acts.dtype)
        return grads_out, acts

    def rotated_gradients(self, capture: Capture) -> torch.Tensor:
        """Per-sequence Q_Sᵀ G_m Q_A (B, d_out, d_in)."""
        grads_out, acts = self.rotated_tokens(capture)
        return torch.einsum("bto,bti->boi", grads_out, acts)

    def denominator(self, power: float) -> torch.Tensor | float:
        if self.diagonal is None:
            return 1.0
        return (self.diagonal + self.damping) ** power

    def half_precondition(self, rotated: torch.Tensor) -> torch.Tensor:
        """Ĝ = (Q_Sᵀ G Q_A) ⊘ sqrt(D + λ), from an already rotated gradient."""
        return rotated / self.denominator(0.5)

    def rotated_inverse_hvp(self, capture: Capture) -> torch.Tensor:
        """(F + λI)⁻¹ vec(G) in the eigenbasis, Q_Sᵀ G Q_A ⊘ (D + λ), from captures: no rotation
        back to parameter coordinates, which costs d_out·d_in·(d_out + d_in) per module."""
        return self.rotated_gradients(capture) / self.denominator(1.0)

    def inverse_hvp(self, grads: torch.Tensor) -> torch.Tensor:
        """(F + λI)⁻¹ vec(G) in parameter layout (d_out, d_in)."""
        return self.unrotate(self.rotate(grads) / self.denominator(1.0))

    def fisher_matrix(self) -> torch.Tensor:
        """The explicit undamped approximation Q diag(D) Qᵀ (row-major vec); for tests and evals."""
        d_out, d_in = self.diagonal.shape
        basis = (torch.kron(self.eigvecs_out, self.eigvecs_in) if self.eigvecs_out is not None
                 else torch.eye(d_out * d_in, dtype=self.diagonal.dtype))
        return basis @ torch.diag(self.diagonal.reshape(-1)) @ basis.T


@dataclass
class Factors:
    """The fitted factors of every tracked module, with the settings that made them."""

    config: FactorConfig
    modules: list[TrackedModule]
    per_module: dict[str, ModuleFactors]
    info: dict = field(default_factory=dict)  # n_sequences, n_tokens of the fitting sample

    def __getitem__(self, name: str) -> ModuleFactors:
        return self.per_module[name]

    def to(self, device=None, dtype=None) -> "Factors":
        moved = {name: f.to(device, dtype) for name, f in self.per_module.items()}
        return replace(self, per_module=moved)

    def with_damping(self, damping_factor: float | None = None, damping: float | None = None) -> "Factors":
        """The same fit with another damping (no refit: λ depends only on D)."""
        config = replace(self.config, damping_factor=self.config.damping_factor if damping_factor is None
                         else damping_factor, damping=damping)
        per_module = {name: replace(f, damping=damping_for(f.diagonal, config))
                      for name, f in self.per_module.items()}
        return replace(self, config=config, per_module=per_module)

    def save(self, path: str | Path) -> None:
        """Write one safetensors file (no pickle) atomically."""
        from safetensors.torch import save_file

        tensors = {}
        for name, f in self.per_module.items():
            for key in ("eigvecs_out", "eigvecs_in", "diagonal"):
                value = getattr(f, key)
                if value is not None:
                    tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
        header = {
            "format_version": FACTORS_FORMAT_VERSION,
            "config": asdict(self.config),
            "modules": [asdict(m) for m in self.modules],
            "damping": {name: f.damping for name, f in self.per_module.items()},
            "info": self.info,
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"attribdb": json.dumps(header)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None) -> "Factors":
        """Read factors, converting each tensor as it is read: only one float64 tensor is ever
        held beside the ``dtype`` copies on ``device`` (the file keeps the fit's float64)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StoreError(f"no factors at {path}: run `attribdb fit` first")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads(handle.metadata()["attribdb"])
                tensors = {key: handle.get_tensor(key).to(device=device, dtype=dtype) for key in handle.keys()}
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise StoreError(f"cannot read factors {path}: {exc}") from exc
        if header.get("format_version") != FACTORS_FORMAT_VERSION:
            raise StoreError(f"factors {path} have format {header.get('format_version')}, "
                             f"this attribdb reads {FACTORS_FORMAT_VERSION}")
        modules = [TrackedModule(**m) for m in header["modules"]]
        per_module = {
            m.name: ModuleFactors(tensors.get(f"{m.name}/eigvecs_out"), tensors.get(f"{m.name}/eigvecs_in"),
                                  tensors.get(f"{m.name}/diagonal"), header["damping"][m.name])
            for m in modules
        }
        return cls(FactorConfig(**header["config"]), modules, per_module, header["info"])


def damping_for(diagonal: torch.Tensor | None, config: FactorConfig) -> float:
    """λ for one module: absolute if given, else damping_factor × mean(D)."""
    if diagonal is None:
        return 0.0
    if config.damping is not None:
        return float(config.damping)
    return float(config.damping_factor * diagonal.mean())
