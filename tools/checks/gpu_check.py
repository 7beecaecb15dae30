"""Does attribdb on a GPU give the answers it gives on the CPU?

On a machine with CUDA this builds the same small database twice, once with
``--device cuda`` and once with ``--device cpu``, from a tiny GPT-2 and a
corpus made locally (no download), and compares the two through the public
Python API only (the on-disk row format is not part of the contract):

1. fit, then build the first corpus with a crash injected after the second
   commit (the build raises, as a kill would stop it), then build again: the
   resume must finish the interrupted shard, and its stored rows must be
   bit-identical to those of an uninterrupted build on the same device
   (attribdb makes CUDA kernels deterministic, ``attribdb.models.deterministic_on``:
   atomic-add reductions would otherwise sum in another order each run);
2. append a second corpus;
3. ``info`` and ``verify`` of both databases agree (rows, shards, documents);
4. every row's stored self-influence, and the answers of every query in each
   mode (index, exact, exhaustive): the same rows in the same order, and
   scores equal within ``--tolerance`` (default 2e-3) of the largest |score|
   in the list; two rows may trade places only where their scores are that
   close (a tie at float precision);
5. a ``fit_precision=bfloat16`` fit (autocast, a bfloat16 correction, float32
   eigendecompositions: other code paths on CUDA than on the CPU) on each
   side: exhaustive answers, which read nothing but the factors and the
   tokens, within 3% of each list's largest |score|.

Why not bit-equality: the rows are float16 and the GPU sums in another order,
so scores differ in the last float32 digits. TF32 is switched off, and the
fit uses the empirical Fisher: the true Fisher samples labels from a torch
generator, whose draws differ between CPU and CUDA by design.

Elsewhere it prints "no CUDA device" and exits 0. ``--device cpu`` runs the
whole comparison against a second CPU run, which is how this script is tested
on machines without a GPU.

Run: python -m tools.checks.gpu_check [--device cuda:0] [--workdir DIR] [--tolerance 2e-3]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tools.benchutil import english_paragraphs, make_model, write_corpus

SETTINGS = dict(max_length=32, shard_size=48, commit_rows=8, batch_size=8, fit_sample_size=64, row_bytes=4096,
                fisher="empirical")
QUERIES = [("The function returns", " a new list."), ("An exception is raised when", " the file does not exist."),
           ("The default value is", " None."), ("Each module has", " its own namespace.")]
QUERY_ITEMS = [{"prompt": p, "completion": c} for p, c in QUERIES]
K = 8
CRASH_AFTER_COMMITS = 2
LOW_PRECISION_TOLERANCE = 3e-2  # bfloat16 fits: the CPU and the GPU round their products in other orders


class InjectedCrash(RuntimeError):
    """Stands in for a kill in the middle of a build."""


@contextmanager
def crash_after(commits: int):
    """Make the shard writer fail after ``commits`` commits, once: an interrupted build."""
    from attribdb.shard import ShardWriter

    original = ShardWriter.append
    done = [0]

    def append(self, *args, **kwargs):
        if done[0] == commits:
            raise InjectedCrash(f"build interrupted after {commits} commits")
        original(self, *args, **kwargs)
        done[0] += 1

    ShardWriter.append = append
    try:
        yield
    finally:
        ShardWriter.append = original


def build_database(db: Path, corpus: Path, extra: Path, model: Path, device: str) -> None:
    """fit → interrupted build → resumed build → append, all on ``device``."""
    from attribdb import api
    from attribdb.manifest import Manifest

    api.fit(db, str(corpus), str(model), device=device, quiet=True, **SETTINGS)
    with crash_after(CRASH_AFTER_COMMITS):
        try:
            api.build(db, str(corpus), device=device, quiet=True)
        except InjectedCrash:
            pass
        else:
            raise AssertionError("the injected crash did not happen: the corpus is too small to interrupt")
    assert Manifest.load(db).building() is not None, "the interrupted build should be unfinished"
    api.build(db, str(corpus), device=device, quiet=True)
    api.build(db, str(extra), append=True, device=device, quiet=True)


def uninterrupted(db: Path, corpus: Path, extra: Path, model: Path, device: str) -> None:
    """The same fit, build and append as :func:`build_database`, with no crash."""
    from attribdb import api

    api.fit(db, str(corpus), str(model), device=device, quiet=True, **SETTINGS)
    api.build(db, str(corpus), device=device, quiet=True)
    api.build(db, str(extra), append=True, device=device, quiet=True)


def low_precision_fits_differ(workdir: Path, corpus: Path, model: Path, device: str) -> list[str]:
    """Check 5: the same bfloat16 fit on the device and on the CPU, compared by exhaustive answers."""
    from attribdb import api

    found = {}
    for label, dev in (("device", device), ("cpu", "cpu")):
        db = workdir / f"db-bfloat16-{label}"
        api.fit(db, str(corpus), str(model), device=dev, quiet=True, **SETTINGS, fit_precision="bfloat16")
        api.build(db, str(corpus), device=dev, quiet=True)
        database = api.open(db, device=dev)
        try:
            found[label] = [[_hit(h, "score") for h in result.hits]
                            for result in database.exhaustive(QUERY_ITEMS, k=K)]
        finally:
            database.close()
    return [problem for number, (mine, theirs) in enumerate(zip(found["device"], found["cpu"]))
            for problem in compare_lists(f"bfloat16 fit, exhaustive q{number}", mine, theirs, LOW_PRECISION_TOLERANCE)]


def stored_rows_differ(resumed: Path, straight: Path) -> list[str]:
    """Shards whose stored arrays are not bit-identical between two databases.  The one place this
    script reads the row store itself: bit-identity is a property of what is stored."""
    from attribdb import layout
    from attribdb.manifest import Manifest
    from attribdb.shard import ShardReader

    manifest = Manifest.load(resumed)
    if manifest.shard_ids != Manifest.load(straight).shard_ids:
        return ["resumed and uninterrupted builds hold different shards"]
    problems = []
    for shard_id in manifest.shard_ids:
        readers = [ShardReader(layout.shard_dir(db, shard_id), manifest.row_layout()) for db in (resumed, straight)]
        try:
            for name in layout.ROW_ARRAYS:
                a, b = (reader.read(name) for reader in readers)
                if a.shape != b.shape or a.tobytes() != b.tobytes():
                    problems.append(f"shard {shard_id:05d} {name}: the resumed build stored other bits than "
                                    "the uninterrupted one")
        finally:
            for reader in readers:
                reader.close()
    return problems


def answers(db: Path, device: str) -> dict:
    """Everything the comparison reads, as plain Python values (no tensors, no devices).

    A step that raises is recorded as its one-line error, so one broken mode
    does not hide the others' comparisons.
    """
    from attribdb import api

    database = api.open(db, device=device)
    try:
        info = database.info()
        report = database.verify()
        rows = info["sequences"]
        out = {"counts": {"sequences": rows, "shards": info["shards"], "documents": info["documents"],
                          "verified_rows": report.rows, "verified_shards": report.shards},
               "self_influence": _guarded(lambda: [_hit(h, "self_influence")
                                                   for h in database.self_influence(top=rows)])}
        # every row is a candidate: the comparison is of scores, not of the sketch's sampling noise
        modes = {"index": lambda: database.query_batch(QUERY_ITEMS, k=K, candidates=rows),
                 "exact": lambda: database.exact_batch(QUERY_ITEMS, k=K, candidates=rows),
                 "exhaustive": lambda: database.exhaustive(QUERY_ITEMS, k=K)}
        for mode, ask in modes.items():
            results = _guarded(ask)
            if isinstance(results, Failure):
                out[mode] = results
                continue
            for number, result in enumerate(results):
                out[f"{mode} q{number} hits"] = [_hit(h, "score") for h in result.hits]
                out[f"{mode} q{number} opponents"] = [_hit(h, "score") for h in result.opponents]
                out[f"{mode} q{number} normalized"] = [_hit(h, "normalized_score") for h in result.hits]
                if mode == "exact":
                    out[f"{mode} q{number} exact scores"] = [_hit(h, "exact_score") for h in result.hits]
                    out[f"{mode} q{number} token sums"] = [((h.shard, h.row), sum(h.token_contributions))
                                                          for h in result.hits]
        return out
    finally:
        database.close()


class Failure(str):
    """The one-line error of a step that raised."""


def _guarded(step):
    try:
        return step()
    except Exception as exc:  # report every failing step, whatever it raises
        return Failure(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")


def _hit(hit, field: str) -> tuple[tuple[int, int], float]:
    return (hit.shard, hit.row), float(getattr(hit, field))


def compare_lists(name: str, mine: list, theirs: list, tolerance: float) -> list[str]:
    """Problems between two ranked (row, value) lists: lengths, values and rows position by position."""
    if len(mine) != len(theirs):
        return [f"{name}: {len(mine)} entries against {len(theirs)}"]
    scale = max([abs(v) for _, v in mine + theirs] + [1e-30])
    problems = []
    theirs_by_row = dict(theirs)
    mine_by_row = dict(mine)
    for position, ((row_a, a), (row_b, b)) in enumerate(zip(mine, theirs)):
        if not (math.isfinite(a) and math.isfinite(b)) or abs(a - b) > tolerance * scale:
            problems.append(f"{name} #{position}: {a:.6g} against {b:.6g} (tolerance {tolerance * scale:.3g})")
        elif row_a != row_b:
            # a swap is a tie only if each row's value on the other side is as close as the tolerance
            tied = all(abs(value - by_row[row]) <= tolerance * scale
                       for row, value, by_row in ((row_a, a, theirs_by_row), (row_b, b, mine_by_row))
                       if row in by_row)
            if not tied:
                problems.append(f"{name} #{position}: row {row_a} against row {row_b}")
    return problems


def compare(mine: dict, theirs: dict, tolerance: float) -> list[str]:
    """Problems between the device's answers (``mine``) and the CPU's."""
    problems = [f"counts: {mine['counts']} against {theirs['counts']}"] if mine["counts"] != theirs["counts"] else []
    for name in sorted((set(mine) | set(theirs)) - {"counts"}):
        a, b = mine.get(name), theirs.get(name)
        failed = [f"{side}: {value}" for side, value in (("device", a), ("cpu", b)) if isinstance(value, Failure)]
        if failed:
            problems.append(f"{name} failed on " + "; ".join(failed))
        elif a is None or b is None:
            problems.append(f"{name}: answered on one side only")
        else:
            problems += compare_lists(name, a, b, tolerance)
    return problems


def prepare_inputs(workdir: Path) -> tuple[Path, Path, Path]:
    """A tiny GPT-2 with a locally trained tokenizer, and two small corpora; all made here, offline."""
    texts = english_paragraphs()
    model = make_model(workdir / "model", texts, layers=2, width=32, vocab=512, positions=64)
    corpus = write_corpus(workdir / "corpus.jsonl", 30, seed=0)
    extra = write_corpus(workdir / "extra.jsonl", 8, seed=1)
    return model, corpus, extra


def run(device: str, workdir: Path, tolerance: float) -> list[str]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, corpus, extra = prepare_inputs(workdir)
    results = {}
    for label, dev in (("device", device), ("cpu", "cpu")):
        db = workdir / f"db-{label}"
        print(f"{label} ({dev}): fit, interrupted build, resume, append ...", file=sys.stderr)
        built = _guarded(lambda db=db, dev=dev: build_database(db, corpus, extra, model, dev))
        if isinstance(built, Failure):
            return [f"fit/build/resume/append on {dev} failed: {built}"]
        print(f"{label} ({dev}): queries in every mode ...", file=sys.stderr)
        results[label] = answers(db, dev)
    print(f"{device}: the same build uninterrupted, for bit-identity with the resumed one ...", file=sys.stderr)
    straight = workdir / "db-device-uninterrupted"
    built = _guarded(lambda: uninterrupted(straight, corpus, extra, model, device))
    if isinstance(built, Failure):
        return [f"uninterrupted build on {device} failed: {built}"]
    print(f"{device} and cpu: a bfloat16 fit each ...", file=sys.stderr)
    low_precision = _guarded(lambda: low_precision_fits_differ(workdir, corpus, model, device))
    if isinstance(low_precision, Failure):
        low_precision = [f"bfloat16 fit failed: {low_precision}"]
    counts = results["cpu"]["counts"]
    print(f"compared {counts['sequences']} rows in {counts['shards']} shards, {len(QUERIES)} queries × 3 modes; "
          f"resumed against uninterrupted build on {device}, bit for bit")
    return (stored_rows_differ(workdir / "db-device", straight) + compare(results["device"], results["cpu"], tolerance)
            + low_precision)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device compared with the CPU (default: cuda)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model, corpora and databases here")
    parser.add_argument("--tolerance", type=float, default=2e-3,
                        help="largest difference of a score, relative to the largest |score| of its list")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    with tempfile.TemporaryDirectory(prefix="attribdb-gpu-check-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        problems = run(args.device, workdir, args.tolerance)
    for problem in problems[:50]:
        print(problem)
    if problems:
        print(f"FAILED: {len(problems)} differences beyond tolerance {args.tolerance} on {args.device}")
        return 1
    print(f"ok: {args.device} and cpu agree within {args.tolerance} of each list's largest |score| "
          f"({LOW_PRECISION_TOLERANCE} for the bfloat16 fits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
