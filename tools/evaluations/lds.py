"""Linear datamodeling score (LDS) of a causal LM's attribution scores, from retrained halves.

The LDS (Park et al. 2023, TRAK; used by kronfluence and bergson) asks whether scores predict what
retraining does: draw random halves of the training documents, retrain the model on each half with
the same recipe, and measure each query's completion loss.  Per query, the LDS is the Spearman
correlation over halves between the loss predicted by the scores, ``−Σ_{m ∈ half} score(q, m)``
(a positive score means the document made the completion likelier, so keeping it lowers the loss),
and the loss reached.  The figure is the mean over queries ± its standard error.

Retrainings are the expensive part and do not depend on the scores, so each half's query losses
are stored on disk as soon as it is trained (``lds/half-NNN-seed-S.json`` beside the world's
model; the model itself is not kept) and a rerun trains only what is missing: scores of a new
representation are judged at no training cost, and an interrupted run resumes at the next half.

The noise ceiling: some halves are retrained again with other training seeds; per query, the
Spearman over those halves between the two retrainings' losses says how far retraining itself
agrees with itself, the most any score could reach.  ``--seeds N`` averages N retrainings per
half (TRAK's ensemble), which lifts that ceiling at N times the cost.

Run: python -m tools.evaluations.lds [--workdir /work/cache/lds] [--halves 50] [--noise-halves 10]
trains what is missing and prints the noise ceiling (one half of the real-text world: 150 steps, about
40 s of one core; 50 halves and 10 noise halves took 56 minutes of wall clock on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tools.evaluations.realtext import RealTextConfig, RealTextWorld, corpus_tokens, real_text_world, recipe


@dataclass(frozen=True)
class LDSConfig:
    halves: int = 50
    seed: int = 0  # draws the halves
    noise_halves: int = 10  # the first this many halves, retrained again with the next `seeds` seeds
    seeds: int = 1  # training seeds per half whose losses are averaged (TRAK's ensemble): the full
    #                 model's seed s and s+1, ..., s+seeds-1; the noise ceiling's second ensemble takes the next ones


@dataclass(frozen=True)
class Summary:
    mean: float
    standard_error: float
    per_query: list[float]

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.standard_error:.3f}"


# ---- statistics -------------------------------------------------------------------


def spearman(x, y) -> float:
    """Spearman's rank correlation, ties at their average rank; 0 where either side is constant
    (a score that predicts the same loss for every half says nothing)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(np.asarray(x, dtype=float)), rankdata(np.asarray(y, dtype=float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denominator if denominator > 0 else 0.0


def summarise(values: list[float]) -> Summary:
    array = np.asarray(values, dtype=float)
    error = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else 0.0
    return Summary(float(array.mean()), error, [float(v) for v in values])


def draw_halves(n_docs: int, count: int, seed: int) -> torch.Tensor:
    """(count, n_docs) boolean masks, each keeping a random ⌊n/2⌋ of the documents."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, n_docs, dtype=torch.bool)
    for i in range(count):
        masks[i, torch.randperm(n_docs, generator=generator)[: n_docs // 2]] = True
    return masks


def centre(values: torch.Tensor) -> torch.Tensor:
    """(halves, queries) less each half's mean over the queries."""
    return values - values.mean(1, keepdim=True)


def lds(doc_scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor, centred: bool = False) -> Summary:
    """LDS of ``doc_scores`` (queries × documents) against ``losses`` (halves × queries) reached
    on the halves ``masks`` (halves × documents).

    ``centred``: losses and predictions both taken relative to their mean over the queries on the
    same half.  A model retrained from scratch for a short while ends better or worse as a whole by
    the luck of its initialisation and data order, which moves every query's loss together, and a
    second seed does not reproduce it (measured: it is what drove the plain noise ceiling to zero);
    centring removes that shift and keeps what differs between queries, which is what attribution
    claims to explain.  Not the standard LDS: reported beside it, never instead."""
    predicted = -(masks.double() @ doc_scores.double().T)  # (halves, queries)
    if centred:
        predicted, losses = centre(predicted), centre(losses)
    return summarise([spearman(predicted[:, q], losses[:, q]) for q in range(losses.shape[1])])


# ---- query losses -------------------------------------------------------------------


def completion_losses(model_dir: Path, queries: list[tuple[str, str]]) -> list[float]:
    """Each query's summed negative log-likelihood of its completion given its prompt: attribdb's
    query measurement (CausalLMTask.measurement), on the tokens attribdb's query engine makes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attribdb.tasks import CausalLMTask, collate_sequences

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    token_ids, starts = [], []
    for prompt, completion in queries:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        token_ids.append(prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"])
        starts.append(len(prompt_ids))
    batch = collate_sequences(token_ids, tokenizer.pad_token_id, score_from=starts)
    with torch.no_grad():
        return CausalLMTask().token_losses(model, batch).sum(1).tolist()


def mean_losses(model_dir: Path, queries: list[tuple[str, str]]) -> float:
    """Mean per-token completion loss over ``queries`` (what a training loss curve shows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in queries)
    return sum(completion_losses(model_dir, queries)) / tokens


# ---- retraining -----------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Retrainings:
    """The query losses of models retrained on halves of a world's corpus, cached per half and seed."""

    def __init__(self, world: RealTextWorld, config: LDSConfig = LDSConfig()):
        self.world, self.config = world, config
        self.doc_ids = world.doc_ids
        self.masks = draw_halves(len(self.doc_ids), config.halves, config.seed)
        self.queries = [(q["prompt"], q["completion"]) for q in world.queries]
        self.folder = world.model_dir.parent / "lds"

    def _fingerprint(self, half: int, seed: int) -> dict:
        kept = [d for d, keep in zip(self.doc_ids, self.masks[half].tolist()) if keep]
        digest = lambda value: hashlib.sha256(json.dumps(value).encode()).hexdigest()  # noqa: E731
        return {"documents": digest(kept), "queries": digest(self.queries), "seed": seed,
                "world": asdict(self.world.config), "corpus": digest(self.world.corpus.read_text())}

    def losses(self, half: int, seed: int) -> list[float]:
        """The query losses of the model retrained on ``half`` with training seed ``seed``: read
        from its file, or trained now (then written, and the model deleted)."""
        import shutil

        from attribdb.demo.train import train_model

        path = self.folder / f"half-{half:03d}-seed-{seed}.json"
        fingerprint = self._fingerprint(half, seed)
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached["fingerprint"] == fingerprint:
                return cached["losses"]
        self.folder.mkdir(parents=True, exist_ok=True)
        kept = {d for d, keep in zip(self.doc_ids, self.masks[half].tolist()) if keep}
        corpus = self.folder / f"half-{half:03d}.jsonl"
        corpus.write_text("".join(line + "\n" for line in self.world.corpus.read_text().splitlines()
                                  if line.strip() and json.loads(line)["id"] in kept))
        config = recipe(self.world.config, corpus_tokens(corpus, self.world.tokenizer_dir))
        config = type(config)(**{**asdict(config), "seed": seed})
        started = time.time()
        model = train_model(corpus, self.folder / "model-training", config, progress=False,
                            tokenizer_from=self.world.tokenizer_dir)
        losses = completion_losses(model, self.queries)
        shutil.rmtree(model)
        corpus.unlink()
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"fingerprint": fingerprint, "losses": losses, "steps": config.train_steps,
                                       "seconds": round(time.time() - started, 1)}))
        partial.rename(path)
        log(f"half {half} seed {seed}: {config.train_steps} steps in {time.time() - started:.0f}s")
        return losses

    def loss_matrix(self, halves: range | None = None, ensemble: int = 0) -> torch.Tensor:
        """(halves, queries) losses, each the mean over ``config.seeds`` training seeds (``ensemble``
        1: the next as many seeds, for the noise ceiling), training whatever is not cached yet."""
        first = self.world.config.model.seed + ensemble * self.config.seeds
        halves = halves if halves is not None else range(self.config.halves)
        return torch.tensor([[sum(v) / len(v) for v in zip(*(self.losses(h, s) for s in
                                                             range(first, first + self.config.seeds)))]
                             for h in halves], dtype=torch.float64)

    def noise_ceiling(self, centred: bool = False) -> Summary:
        """Per query, Spearman over the noise halves between two training seeds' losses, summarised
        (``centred``: as :func:`lds` centres them)."""
        halves = range(self.config.noise_halves)
        first, second = self.loss_matrix(halves), self.loss_matrix(halves, ensemble=1)
        if centred:
            first, second = centre(first), centre(second)
        return summarise([spearman(first[:, q], second[:, q]) for q in range(first.shape[1])])

    def doc_scores(self, results) -> torch.Tensor:
        """(queries × documents) from per-query results with hits (every row's score summed into its document)."""
        column = {d: i for i, d in enumerate(self.doc_ids)}
        scores = torch.zeros(len(results), len(self.doc_ids), dtype=torch.float64)
        for q, hits in enumerate(results):
            for doc_id, score in hits:
                scores[q, column[doc_id]] += score
        return scores

    def lds(self, doc_scores: torch.Tensor, centred: bool = False) -> Summary:
        return lds(doc_scores, self.masks, self.loss_matrix(), centred)


def add_lds_options(parser) -> None:
    parser.add_argument("--halves", type=int, default=LDSConfig.halves)
    parser.add_argument("--noise-halves", type=int, default=LDSConfig.noise_halves)
    parser.add_argument("--seeds", type=int, default=LDSConfig.seeds,
                        help="retrainings per half, their losses averaged (each costs as much as the first)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/cache/lds"))
    add_lds_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    world = real_text_world(args.workdir, RealTextConfig())
    retrainings = Retrainings(world, LDSConfig(halves=args.halves, noise_halves=args.noise_halves, seeds=args.seeds))
    losses = retrainings.loss_matrix()
    ceiling, centred = retrainings.noise_ceiling(), retrainings.noise_ceiling(centred=True)
    print(f"{world.name}: {len(retrainings.doc_ids)} documents, {len(retrainings.queries)} queries, "
          f"{args.halves} halves (loss per query over halves: mean {float(losses.mean()):.2f}, "
          f"spread {float(losses.std(0).mean()):.3f})")
    print(f"noise ceiling over {args.noise_halves} halves, two ensembles of {args.seeds} seeds: {ceiling}; "
          f"centred: {centred}")
    print(f"{time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
