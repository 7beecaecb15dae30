"""Build throughput and storage, as ratios to baselines measured in the same run.

- throughput: sequences/s of `attribdb build` (factors already fitted) over
  sequences/s of a plain forward+backward pass of the same model on the same
  sequences, same batch size (goal: >= 0.5);
- storage: Zarr bytes per sequence over the bytes of the dense float32 Ĝ;
- memory: peak RSS of the build on the corpus and on a corpus twice as large
  (goal: a ratio near 1, the build streams);
- the same throughput and storage with ``--tail-rank 24`` (the re-ranking tail
  that brings index answers within 2% of exhaustive, tools/bench_query.py).

Run: python tools/bench_build.py [--docs 1500] [--workdir /tmp/attribdb-bench-build]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import english_paragraphs, make_model, peak_rss_mib, write_corpus  # noqa: E402

SETTINGS = {"max_length": 128, "batch_size": 8, "commit_rows": 64, "shard_size": 1024, "fit_sample_size": 256}
TAIL = {"tail_rank": 24}


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
    out = subprocess.run([sys.executable, __file__, "--worker", command, str(db), str(corpus), str(model),
                          json.dumps(extra)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def forward_backward_rate(model_dir: Path, corpus: Path, n_sequences: int) -> float:
    """Sequences/s of loss.backward() on the first sequences of the corpus: the floor of any gradient method."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attribdb.settings import DatabaseSettings
    from attribdb.tasks import CausalLMTask, collate_sequences
    from indexer import sequences
    from indexer.corpus import CorpusSpec

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    settings = DatabaseSettings(model_path=str(model_dir), **SETTINGS)
    token_ids = [list(s.token_ids) for _, s in zip(range(n_sequences),
                                                    sequences.stream(CorpusSpec(str(corpus)), tokenizer, settings))]
    task, size = CausalLMTask(), SETTINGS["batch_size"]
    started = time.perf_counter()
    for i in range(0, len(token_ids), size):
        model.zero_grad(set_to_none=True)
        task.train_loss(model, collate_sequences(token_ids[i:i + size], tokenizer.pad_token_id)).backward()
    return len(token_ids) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1500)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/attribdb-bench-build"))
    parser.add_argument("--worker", nargs=5, metavar=("COMMAND", "DB", "CORPUS", "MODEL", "SETTINGS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "model", english_paragraphs())
    figures = {}
    for label, docs, extra in (("small", args.docs, {}), ("large", 2 * args.docs, {}), ("tail", args.docs, TAIL)):
        corpus = write_corpus(work / f"corpus-{label}.jsonl", docs)
        db = work / f"db-{label}"
        shutil.rmtree(db, ignore_errors=True)
        fit = run_worker("fit", db, corpus, model, extra)
        build = run_worker("build", db, corpus, model, extra)
        from attribdb import api

        info = api.open(db).info()
        figures[label] = {"fit": fit, "build": build, "info": info}
        print(f"{label}: {info['sequences']} sequences, fit {fit['seconds']:.1f}s, build {build['seconds']:.1f}s, "
              f"peak RSS {build['peak_rss_mib']:.0f} MiB", file=sys.stderr)

    small = figures["small"]
    n = small["info"]["sequences"]
    baseline = forward_backward_rate(model, work / "corpus-small.jsonl", n)
    build_rate = n / small["build"]["seconds"]
    info = small["info"]
    storage_ratio = info["bytes_per_sequence"] / info["dense_float32_bytes_per_sequence"]
    memory_ratio = figures["large"]["build"]["peak_rss_mib"] / small["build"]["peak_rss_mib"]
    energy = sum(info["energy_kept"].values()) / len(info["energy_kept"])
    print(f"model: {len(info['energy_kept'])} tracked modules, {info['dense_float32_bytes_per_sequence'] / 2**20:.2f}"
          f" MiB dense float32 Ĝ per sequence; rank {info['settings']['rank']} keeps {energy:.3f} of ‖Ĝ‖² on average")
    print(f"forward+backward baseline: {baseline:.1f} seq/s; build (incl. reading and tokenising the corpus, "
          f"FAISS, LMDB, Zarr): {build_rate:.1f} seq/s")
    print(f"throughput ratio build / forward+backward: {build_rate / baseline:.3f}  (goal >= 0.5)")
    print(f"bytes per sequence: {info['bytes_per_sequence'] / 1024:.1f} KiB; ratio to dense float32 Ĝ: "
          f"{storage_ratio:.4f}")
    print(f"peak build memory: {small['build']['peak_rss_mib']:.0f} MiB for {n} sequences, "
          f"{figures['large']['build']['peak_rss_mib']:.0f} MiB for {figures['large']['info']['sequences']}: "
          f"ratio {memory_ratio:.3f}  (goal ~1: the build streams)")
    tail = figures["tail"]["info"]
    with_tail = sum(tail["energy_kept_with_tail"].values()) / len(tail["energy_kept_with_tail"])
    print(f"with --tail-rank {TAIL['tail_rank']}: throughput ratio "
          f"{tail['sequences'] / figures['tail']['build']['seconds'] / baseline:.3f}, "
          f"{tail['bytes_per_sequence'] / 1024:.1f} KiB per sequence "
          f"({tail['bytes_per_sequence'] / tail['dense_float32_bytes_per_sequence']:.4f} of dense), "
          f"rank {tail['settings']['rank'] + TAIL['tail_rank']} keeps {with_tail:.3f} of ‖Ĝ‖²")


if __name__ == "__main__":
    main()
