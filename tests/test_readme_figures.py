"""Every 'mean ± CI' figure the README and the docs quote comes from a committed results file in
benchmarks/results (as written there, or in AUROC points: ×100, one decimal, signed), so a figure
cannot be typed in by hand or go stale when a results file is regenerated (issue 22)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURE = re.compile(r"[−+-]?\d+\.\d+ ± \d+\.\d+")


def _canonical(text: str) -> str:
    text = text.replace("−", "-").lstrip("+")
    return text[1:] if re.fullmatch(r"-0\.0+ ± .*", text) else text  # -0.0 is 0.0


def _known() -> set[str]:
    known = set()
    for path in (ROOT / "benchmarks" / "results").glob("*.md"):
        for a, b in re.findall(r"([−+-]?\d+\.\d+) ± (\d+\.\d+)", path.read_text().replace("−", "-")):
            known.add(_canonical(f"{a} ± {b}"))
            known.add(_canonical(f"{100 * float(a):.1f} ± {100 * float(b):.1f}"))
    return known


def test_every_quoted_ci_is_in_a_results_file():
    known = _known()
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    quoted = [(page.name, figure) for page in pages for figure in FIGURE.findall(page.read_text())]
    assert len(quoted) > 40
    missing = [(name, figure) for name, figure in quoted if _canonical(figure) not in known]
    assert not missing, f"figures with no results file behind them: {missing}"


@pytest.mark.parametrize("page", ["README.md", "docs/evidence.md"])
def test_primary_table_is_the_preregistered_table(page):
    """The one-row-per-cell tables carry prereg_table.json's gain, CI and verdict for every cell."""
    table = json.loads((ROOT / "benchmarks" / "results" / "prereg_table.json").read_text())
    text = (ROOT / page).read_text().replace("−", "-")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (P\d+) \|.*\|$", text, re.M)}
    assert sorted(rows) == sorted(c["cell"] for c in table["cells"])
    for c in table["cells"]:
        cells = [x.strip() for x in rows[c["cell"]].strip("|").split("|")]
        lo, hi = 100 * (c["mean"] - c["half_width"]), 100 * (c["mean"] + c["half_width"])
        gain, ci = f"{100 * c['mean']:+.1f}", f"[{lo:+.1f}, {hi:+.1f}]"
        assert cells[-1] == c["verdict"] and gain in cells and ci in cells, (page, c["cell"], cells)
