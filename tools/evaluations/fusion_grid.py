"""How the hybrid ranking's fact tracing depends on its two constants, from saved rankings.

The hybrid (``--prefilter bm25:N --rank-by hybrid``) fuses the BM25 top N with their exact
influence order by reciprocal-rank fusion with constant c; the evaluations fix N = 100 and c = 60
(the constant of Cormack et al., 2009) in advance.  This reads the rankings that
``tools/evaluations/eval_facts.py --dump DIR`` saved per world and seed (BM25 on prompt + completion and
exhaustive normalized influence over every document) and prints MRR / recall@10 of the fusion for
other N and c, per seed and averaged: a sensitivity check, not a way to pick them on the test queries.

Run: python -m tools.evaluations.fusion_grid DIR [--worlds world2 demo-small] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.evaluations.baselines import mrr_and_recall, reciprocal_rank_fusion
from tools.evaluations.worlds import mean_spread


def fused_scores(saved: dict, n: int, c: int) -> tuple[float, float]:
    """Mean MRR and recall@10 over the saved queries of the fusion at (n, c)."""
    pairs = []
    for i, fact in enumerate(saved["facts"]):
        text = saved["rankings"]["BM25"][i][:n]
        allowed = set(text)
        influence = [d for d in saved["rankings"]["attribdb exhaustive"][i] if d in allowed]
        ranking = [d for d, _ in reciprocal_rank_fusion([text, influence], c=c)]
        pairs.append(mrr_and_recall(ranking, set(fact["doc_ids"])))
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump", type=Path, help="the --dump folder of tools/evaluations/eval_facts.py")
    parser.add_argument("--worlds", nargs="+", default=["world2", "demo-small"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--c", type=int, nargs="+", default=[1, 10, 60, 200])
    args = parser.parse_args()
    for world in args.worlds:
        saved = [json.loads((args.dump / f"{world}-seed-{seed}.json").read_text()) for seed in args.seeds]
        print(f"\n{world}, seeds {args.seeds}: MRR / recall@10, mean ± sd over seeds")
        print(f"{'':>10}" + "".join(f" {'c = ' + str(c):>27}" for c in args.c))
        for n in args.n:
            cells = []
            for c in args.c:
                runs = [fused_scores(s, n, c) for s in saved]
                cells.append(f"{mean_spread([r[0] for r in runs])} / {mean_spread([r[1] for r in runs])}")
            print(f"{'N = ' + str(n):>10}" + "".join(f" {cell:>27}" for cell in cells))


if __name__ == "__main__":
    main()
