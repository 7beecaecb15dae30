"""The row evaluation (tools/evaluations/eval_rows.py) and what it stands on: the man-page reader,
the LDS statistics, and a smoke run of the smallest configuration end to end."""

from __future__ import annotations

import json

import pytest
import torch

from tools.evaluations.lds import draw_halves, lds, spearman
from tools.evaluations.manpages import is_prose, troff_paragraphs, unescape
from tools.evaluations.manpages import page_files as man_page_files

PAGE = r""".\" a comment that is not prose
.TH TAR 1 "July 13, 2020"
.de XX
a macro definition, dropped
..
.SH NAME
tar \- an archiving utility
.SH DESCRIPTION
The \fBtar\fR program saves many files together into a single archive,
and can restore \fIindividual\fP files from the archive.
.TP
\fB\-f\fR, \fB\-\-file\fR=\fIARCHIVE\fR
Use archive file or device ARCHIVE\(em see
.BR tar (5)
for the format.
.TS
a table | dropped
.TE
"""


def test_troff_paragraphs_keep_the_prose_and_drop_the_markup():
    paragraphs = troff_paragraphs(PAGE)
    assert paragraphs == ["tar - an archiving utility",
                          "The tar program saves many files together into a single archive, and can restore "
                          "individual files from the archive.",
                          "-f, --file=ARCHIVE Use archive file or device ARCHIVE— see tar(5) for the format."]
    assert unescape(r"\(lqquoted\(rq \e \*(lqx\*(rq") == '"quoted" \\ "x"'
    assert troff_paragraphs(".Dd May 1, 2020\n.Nm ls\n") is None  # mdoc: not read
    assert troff_paragraphs(".so man1/other.1\n") is None  # a redirection: read at its target
    assert is_prose(paragraphs[1]) and not is_prose(paragraphs[0])


def test_spearman_and_lds_on_known_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([5, 5, 5, 5], [1, 2, 3, 4]) == 0.0  # a constant predicts nothing

    masks = draw_halves(40, 30, seed=0)
    assert masks.sum(1).tolist() == [20] * 30
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    linear = -(masks.double() @ scores.T)  # losses exactly as the scores predict them
    assert lds(scores, masks, linear).mean == pytest.approx(1.0)
    assert lds(-scores, masks, linear).mean == pytest.approx(-1.0)
    assert lds(torch.ones(5, 40), masks, linear).mean == 0.0
    shifted = linear + torch.randn(30, 1, generator=generator, dtype=torch.float64) * 100  # each model's luck
    assert lds(scores, masks, shifted, centred=True).mean == pytest.approx(1.0)  # centring removes it
    noise = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    unrelated = lds(scores, masks, noise)
    assert abs(unrelated.mean) < 4 * unrelated.standard_error + 0.05


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """The smallest configuration through the product: a tiny model on man-page text, its retrained
    halves, a database; the figures obey what they must whatever the model learned."""
    if len(man_page_files()) < 300:
        pytest.skip("needs Debian's man pages under /usr/share/man")
    from tools.evaluations import eval_rows

    eval_rows.main(["--quick", "--lds-workdir", str(tmp_path), "--json", str(tmp_path / "rows.json")])
    (table,) = json.loads((tmp_path / "rows.json").read_text())
    header = table["header"]
    assert header["self_check"]["spearman"] == pytest.approx(1.0)  # exact against exact
    assert header["self_check"]["pearson"] == pytest.approx(1.0)
    assert header["lds_constant"]["mean"] == 0.0
    assert len(header["lds_exact"]["plain"]["per_query"]) == header["queries"] == eval_rows.QUICK_WORLD.queries
    assert -1 <= header["noise_ceiling"]["plain"]["mean"] <= 1
    documents = eval_rows.QUICK_WORLD.documents
    assert header["rows"] == documents  # one row per document: the LDS drops and keeps whole rows
    for figures, label in zip(table["representations"], eval_rows.QUICK_ROWS):
        assert figures["representation"] == f"rows:{label}"
        assert figures["row"]["all_in"]["total"] <= int(label)
        assert figures["rows"] == documents
        assert 0 < figures["bytes"]["row_and_index"] < figures["bytes"]["all_in"]
        assert -1 <= figures["spearman"] <= 1 and -1 <= figures["pearson"] <= 1
        assert 0 <= figures["recall@10_rescore0"] <= 1 and 0 <= figures["recall@10_default"] <= 1
        assert figures["p50_default_s"]["cpu"] > 0 and figures["default_queries_timed"] == header["queries"]
        assert all(-1 <= v <= 1 for v in figures["lds_rescore0"]["plain"]["per_query"])

    # every retrained half's losses are on disk, so a rerun trains nothing
    halves = sorted(tmp_path.glob("realtext-*/lds/half-*.json"))
    assert len(halves) == eval_rows.QUICK_LDS.halves + eval_rows.QUICK_LDS.noise_halves
