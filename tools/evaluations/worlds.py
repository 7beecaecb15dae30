"""The evaluation worlds that tools/evaluations/eval_facts.py and tools/evaluations/eval_counterfactual.py run on.

A result that holds on one generator's corpus only is not evidence, so each evaluation takes
``--world`` and ``--seeds``: a world is a corpus generator with its corpus, model and database
settings; a seed is the model's training seed (the corpus stays the same), so the spread over seeds
is the spread of training.

- ``demo``: the corpus, model and database of ``attribdb demo`` (2×128 GPT-2, 600 steps of 16).
- ``demo-small``: the demo's generator at 24 facts, with the small model below.
- ``world2``: ``attribdb.demo.world2``: facts inside longer real paragraphs, two facts per person,
  stated once or four times, queried by two held-out phrasings each; the small model.

The small model (2×64, vocabulary 1,024, 800 steps of 8 × 128 tokens) exists for the
counterfactual, which retrains once per method, k and seed: about 1–2 minutes a training on one
thread, where the demo's model takes about 5.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from attribdb.demo.facts import DemoCorpusConfig, generate_corpus
from attribdb.demo.run import FULL, DemoConfig, Prepared, prepare
from attribdb.demo.train import CACHE_FILE, DemoModelConfig, train_model
from attribdb.demo.world2 import World2Config, generate_world

SMALL_MODEL = DemoModelConfig(vocab_size=1024, n_embd=64, batch_size=8, train_steps=800, fact_repeats=24,
                              learning_rate=5e-3)
SMALL_BUILD = {"max_length": 128, "fit_sample_size": 256}


@dataclass(frozen=True)
class World:
    config: DemoConfig
    generate: object  # (out_dir, corpus config) -> (corpus.jsonl, facts)


WORLDS = {
    "demo": World(FULL, generate_corpus),
    "demo-small": World(DemoConfig(DemoCorpusConfig(facts_per_relation=8, background_docs=150), SMALL_MODEL,
                                   SMALL_BUILD, 1), generate_corpus),
    "world2": World(DemoConfig(World2Config(), SMALL_MODEL, SMALL_BUILD, 1), generate_world),
}


def seeded(name: str, seed: int) -> DemoConfig:
    config = WORLDS[name].config
    return replace(config, model=replace(config.model, seed=seed))


def prepare_world(name: str, workdir: Path, seed: int) -> Prepared:
    """Corpus, model trained with ``seed`` and its database, in ``workdir/name/seed-N`` (cached)."""
    return prepare(workdir / name / f"seed-{seed}", seeded(name, seed), name, quiet=True,
                   generate=WORLDS[name].generate)


def checkpoint_databases(name: str, seed: int, prepared: Prepared, steps: tuple[int, ...]) -> list[Path]:
    """Databases of the world's model (``prepared``) as it was after each of ``steps`` (cached), for
    influence summed over training by the evaluation itself: the world's training is run again,
    saving those checkpoints, in ``model-checkpoints`` beside the world's model, and each checkpoint
    gets a database at the world's settings.  The final model is not among them: it is the world's
    own, whose database prepare_world made (checked, since the sum relies on it)."""
    from attribdb import api

    run, key = checkpoint_run(name, seed, prepared, steps)
    paths = []
    for step in steps:
        paths.append(prepared.db_path.parent / f"db-{key}-checkpoint-{step}")
        api.build(paths[-1], str(prepared.corpus), str(run / f"checkpoint-{step}"), quiet=True,
                  **seeded(name, seed).build)
    return paths


def trajectory_databases(name: str, seed: int, prepared: Prepared, steps: tuple[int, ...]) -> dict[str, Path]:
    """Per checkpoint weighting (``uniform`` and ``lr``, both chosen before any run: TracIn's two),
    one trajectory database (cached) of the world's model and its checkpoints after ``steps``, at the
    world's settings: what attribdb itself offers for influence summed over training.  Its model is the
    checkpoint run's final one (byte-identical to the world's), which records its learning rate."""
    from attribdb import api

    run, key = checkpoint_run(name, seed, prepared, steps)
    out = {}
    for weights in ("uniform", "lr"):
        out[weights] = prepared.db_path.parent / (f"db-{key}-trajectory-{'-'.join(map(str, steps))}"
                                                  + ("" if weights == "uniform" else f"-{weights}"))
        api.build(out[weights], str(prepared.corpus), str(run), quiet=True, checkpoint_weights=weights,
                  checkpoints=[str(run / f"checkpoint-{step}") for step in steps], **seeded(name, seed).build)
    return out


def checkpoint_run(name: str, seed: int, prepared: Prepared, steps: tuple[int, ...]) -> tuple[Path, str]:
    """The world's training run again (cached), saving ``steps``; checked to end on the world's model."""
    run = rerun_with_checkpoints(prepared.corpus, prepared.db_path.parent / "model-checkpoints",
                                 seeded(name, seed).model, prepared.model_dir, steps)
    return run, hashlib.sha256((run / CACHE_FILE).read_bytes()).hexdigest()[:12]


def rerun_with_checkpoints(corpus: Path, folder: Path, config: DemoModelConfig, model_dir: Path,
                           steps: tuple[int, ...]) -> Path:
    """``model_dir``'s training run again in ``folder`` (cached), its tokenizer reused, saving the
    model after ``steps``; refused unless it ends on ``model_dir``'s very weights."""
    run = train_model(corpus, folder, config, progress=False, tokenizer_from=model_dir, checkpoints=steps)
    if (run / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes():
        raise RuntimeError(f"{run} ended on another model than {model_dir}: training is not reproducible here")
    return run


def add_checkpoints_option(parser) -> None:
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[], help="also checkpoint influence, summed "
                        "over the model after these training steps and the final model: by the evaluation over one "
                        "database per checkpoint, and by attribdb over one trajectory database (one more training "
                        "per seed, cached)")


def commit() -> str:
    """The git commit the figures come from (``+dirty`` when a tracked Python file has changes), printed with them."""
    import subprocess

    here = Path(__file__).parent
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=here, capture_output=True, text=True, check=False).stdout.strip()

    return (git("rev-parse", "--short", "HEAD")
            + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", "*.py") else ""))


def mean_spread(values: list[float]) -> str:
    """"mean ± sample standard deviation" over seeds; the mean alone for one seed."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"
