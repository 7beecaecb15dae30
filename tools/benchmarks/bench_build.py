"""Fit and build cost, as ratios to a plain training step measured in the same run.

For each model shape (a tiny 4×128 GPT-2 and a GPT-2-small-shaped 12×768 one,
random init, small vocabulary: speed and bytes do not depend on training):

- build throughput: sequences/s of `attribdb build` (factors already fitted,
  corpus reading, Zarr, LMDB and FAISS included) over sequences/s of a plain
  forward+backward training step (weight gradients included) on the same
  sequences and batch size (goal at 12×768: >= 1.0);
- fit time over the time of the fit sample's own forward+backward steps
  (goal: <= 3), at each fit precision asked for;
- peak RSS of the build process (goal at 12×768: <= 3 GB), and for the tiny
  shape the peak on a corpus twice as large (goal: ratio ~1, the build streams);
- bytes per row in the row store against the dense float32 Ĝ.

Run: python -m tools.benchmarks.bench_build [--shapes tiny,gpt2-small] [--docs 1500] [--small-docs 400]
     [--fit-precisions float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tools.benchutil import english_paragraphs, make_model, peak_rss_mib, write_corpus

REPOSITORY = Path(__file__).resolve().parents[2]  # the worker runs as a module of the tools package

SETTINGS = {"max_length": 128, "batch_size": 8, "commit_rows": 64, "shard_size": 1024}


@dataclass(frozen=True)
class Shape:
    layers: int
    width: int
    fit_sample: int


SHAPES = {"tiny": Shape(4, 128, 256), "gpt2-small": Shape(12, 768, 512)}


def worker(command: str, db: str, corpus: str, model: str, extra: str) -> None:
    """Runs in a subprocess so its peak memory is its own."""
    from attribdb import api

    settings = SETTINGS | json.loads(extra)
    started = time.perf_counter()
    if command == "fit":
        api.fit(db, corpus, model, quiet=True, **settings)
    else:
        api.build(db, corpus, model, quiet=True, **settings)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()}))


def run_worker(command: str, db: Path, corpus: Path, model: Path, extra: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "tools.benchmarks.bench_build", "--worker", command,
                          str(db), str(corpus), str(model), json.dumps(extra)],
                         capture_output=True, text=True, cwd=REPOSITORY)
    if out.returncode:
        raise SystemExit(f"{command} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def training_step_rate(model_dir: Path, corpus: Path, n_sequences: int) -> float:
    """Sequences/s of a training step's forward and backward (loss.backward(), weight gradients
    included) on the corpus's first sequences, in the build's batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attribdb.indexer import sequences
    from attribdb.indexer.corpus import CorpusSpec
    from attribdb.settings import DatabaseSettings
    from attribdb.tasks import CausalLMTask, collate_sequences

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    settings = DatabaseSettings(model_path=str(model_dir), **SETTINGS)
    token_ids = [list(s.token_ids) for _, s in zip(range(n_sequences),
                                                    sequences.stream(CorpusSpec(str(corpus)), tokenizer, settings))]
    token_ids.sort(key=len)  # batched by length, as the build batches
    task, size = CausalLMTask(), SETTINGS["batch_size"]
    started = time.perf_counter()
    for i in range(0, len(token_ids), size):
        model.zero_grad(set_to_none=True)
        task.train_loss(model, collate_sequences(token_ids[i:i + size], tokenizer.pad_token_id)).backward()
    return len(token_ids) / (time.perf_counter() - started)


def measure(name: str, shape: Shape, docs: int, work: Path, twice: bool, precisions: list[str]) -> dict:
    """The build once (its factors fitted at the first precision), and a fit at every precision."""
    from attribdb import api

    model = make_model(work / f"model-{name}", english_paragraphs(), layers=shape.layers, width=shape.width)
    runs = {}
    for label, n_docs in (("once", docs), ("twice", 2 * docs)) if twice else (("once", docs),):
        corpus = write_corpus(work / f"corpus-{name}-{label}.jsonl", n_docs)
        fits = {}
        for precision in precisions if label == "once" else precisions[:1]:
            db = work / f"db-{name}-{label}-{precision}"
            shutil.rmtree(db, ignore_errors=True)
            extra = {"fit_sample_size": shape.fit_sample, "fit_precision": precision}
            fits[precision] = run_worker("fit", db, corpus, model, extra)
            print(f"{name} {label}: fit at {precision} {fits[precision]['seconds']:.1f}s", file=sys.stderr, flush=True)
            if precision == precisions[0]:
                build = run_worker("build", db, corpus, model, extra)
                info = api.open(db).info()
        runs[label] = {"fits": fits, "build": build, "info": info}
        print(f"{name} {label}: {info['sequences']} sequences, build {build['seconds']:.1f}s, "
              f"peak RSS {build['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    n = runs["once"]["info"]["sequences"]
    step_rate = training_step_rate(model, work / f"corpus-{name}-once.jsonl", n)
    return {"runs": runs, "sequences": n, "step_rate": step_rate,
            "build_ratio": n / runs["once"]["build"]["seconds"] / step_rate,
            "fit_ratios": {p: fit["seconds"] / (min(shape.fit_sample, n) / step_rate)
                           for p, fit in runs["once"]["fits"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,gpt2-small")
    parser.add_argument("--docs", type=int, default=1500, help="documents for the tiny shape")
    parser.add_argument("--small-docs", type=int, default=400,
                        help="documents for the GPT-2-small shape (enough for its fit sample of 512)")
    parser.add_argument("--fit-precisions", default="float32",
                        help="comma-separated fit precisions to time (float32, bfloat16); the build uses the first")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/attribdb-bench-build"))
    parser.add_argument("--worker", nargs=5, metavar=("COMMAND", "DB", "CORPUS", "MODEL", "SETTINGS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.shapes.split(","):
        docs = args.docs if name == "tiny" else args.small_docs
        results[name] = measure(name, SHAPES[name], docs, args.workdir, twice=name == "tiny",
                                precisions=args.fit_precisions.split(","))
    for name, r in results.items():
        info, once = r["runs"]["once"]["info"], r["runs"]["once"]
        row = info["row"]
        print(f"[{name}] {len(row['subspaces'])} modules; row {row['bytes'] / 1024:.1f} KiB = "
              f"{row['bytes'] / row['dense_float32_bytes']:.5f} of dense float32 Ĝ "
              f"({row['dense_float32_bytes'] / 2**20:.1f} MiB), keeps {row['kept']:.3f} of a sequence's "
              f"self-influence")
        per = info["bytes_per_sequence"]
        print(f"[{name}] on disk per row: zarr {per['zarr'] / 1024:.1f} KiB, faiss {per['faiss'] / 1024:.1f} KiB, "
              f"lmdb {per['lmdb'] / 1024:.1f} KiB")
        print(f"[{name}] training step {r['step_rate']:.2f} seq/s; "
              f"build {r['sequences'] / once['build']['seconds']:.2f} seq/s on {r['sequences']} sequences: "
              f"ratio {r['build_ratio']:.3f}  (goal >= 1.0 at 12×768)")
        for precision, fit in once["fits"].items():
            print(f"[{name}] fit at {precision} {fit['seconds']:.1f}s "
                  f"on {min(SHAPES[name].fit_sample, r['sequences'])} sequences "
                  f"= {r['fit_ratios'][precision]:.2f}× their training steps  (goal <= 3); "
                  f"peak RSS {fit['peak_rss_mib']:.0f} MiB")
        print(f"[{name}] peak RSS of the build {once['build']['peak_rss_mib']:.0f} MiB")
        if "twice" in r["runs"]:
            twice = r["runs"]["twice"]
            print(f"[{name}] build peak RSS for {twice['info']['sequences']} sequences: "
                  f"{twice['build']['peak_rss_mib']:.0f} MiB, "
                  f"ratio {twice['build']['peak_rss_mib'] / once['build']['peak_rss_mib']:.3f}"
                  "  (goal ~1: the build streams)")


if __name__ == "__main__":
    main()
