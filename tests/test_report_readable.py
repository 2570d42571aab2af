"""report.html for a reader (issue 22): plots labelled in words, score axes scaled to the data,
φ as named tables, no title over a legend. Checked on what the files say about themselves: the
axes each PNG records in its metadata (``metapt.plots.axes_record``) and the HTML, not pixels.
(Screenshots in headless Chromium were looked at when this was written.)"""

import base64
import io
import json
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from metapt.cli import app

from ecg_records import write_beat_folder

runner = CliRunner()
RAW_KEYS = re.compile(r"^(pt_loss|meta_loss|hypergrad_norm|solver_residual|phi/)")


@pytest.fixture(scope="module", params=["synthetic", "molecules-test", "ecg-quick"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / request.param
    overrides = {"synthetic": ["--set", "pretrain.steps=150", "--set", "evaluation.seeds=2"],
                 "molecules-test": ["--set", "methods=[no_pretrain, uniform, meta_task_weights]"],
                 "ecg-quick": ["--data", str(write_beat_folder(tmp_path_factory.mktemp("beats")))]}[request.param]
    res = runner.invoke(app, ["run", request.param, "--out", str(out), "--threads", "1", *overrides])
    assert res.exit_code == 0, res.output
    return out


def _records(html: str) -> dict[str, dict]:
    out = {}
    for alt, data in re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([^']+)'>", html):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.width > 300 and image.height > 200, alt
        out[alt] = json.loads(image.text["metapt"])
    return out


def test_every_plot_is_labelled_in_words(run):
    records = _records((run / "report.html").read_text())
    assert {"losses"} <= set(records) and any(k.startswith("scores_") for k in records)
    for name, record in records.items():
        for ax in record["axes"]:
            assert ax["ylabel"].strip() or ax["xlabel"].strip(), (name, ax)  # horizontal bars: names on y
            assert not RAW_KEYS.match(ax["ylabel"]) and not RAW_KEYS.match(ax["xlabel"]), (name, ax)
        assert record["axes"][-1]["xlabel"] or name.startswith("scores_") or name.startswith("task_weights"), name


def test_the_losses_figure_has_its_title_in_the_legend_and_no_flat_panel(run):
    record = _records((run / "report.html").read_text())["losses"]
    assert not record["suptitle"]  # the title heads the legend above the first panel: nothing to overlap
    first = record["axes"][0]
    assert first["legend_title"].startswith("Pre-training and meta-learning") and first["legend"]
    for ax in record["axes"]:
        lo, hi = ax["data_y"]
        assert hi > lo, ax["ylabel"]  # a quantity that never changes is named under the figure instead


def test_score_axes_are_scaled_to_the_scores(run):
    records = _records((run / "report.html").read_text())
    for name, record in records.items():
        if not name.startswith("scores_"):
            continue
        (ax,) = record["axes"]
        means = [m for values in record["means"].values() for m in values if m == m]
        lo, hi = ax["ylim"]
        assert lo <= min(means) and max(means) <= hi, (name, ax["ylim"], means)
        assert max(means) - min(0.0, min(means)) >= 0.1 * (hi - lo), (name, ax["ylim"], means)  # not a sliver
        if "AUROC" in ax["ylabel"]:
            assert 0.0 <= lo and hi <= 1.0


def test_learned_phi_is_a_named_table_not_a_json_dump(run):
    page = (run / "report.html").read_text()
    section = page.split("<h2>Learned meta-parameters</h2>", 1)[1].split("<h2>", 1)[0]
    assert "<table class='phi'>" in section and "<pre>" not in section
    if run.name == "ecg-quick":
        assert "simclr_meta_warp" in section and "magnitude" in section
    else:
        assert "meta_task_weights" in section
    if "molecules" in run.name:
        assert "CHEMBL" in section  # task weights by target name
    elif run.name == "synthetic":
        assert "helpful weight" in section and "noise weight" in section


def test_each_section_opens_with_a_verdict_line(run):
    page = (run / "report.html").read_text()
    results = page.split("<h2>Results</h2>", 1)[1].split("<h2>", 1)[0]
    gain = "SimCLR \\+ meta warp − SimCLR" if run.name == "ecg-quick" else "meta task weights − uniform weights"
    assert re.search(rf"<p class='verdict'>Verdict, \w+ \(paired 95 % CIs\): {gain}: "
                     r"(better|worse|indistinguishable)", results), results[:500]
    learned = page.split("<h2>Learned meta-parameters</h2>", 1)[1].split("<h2>", 1)[0]
    if run.name == "ecg-quick":  # a few named scalars, no weights: the table says it all, and no weights note
        assert "magnitude" in learned and "1 is uniform" not in learned
    else:
        assert re.search(r"<p class='verdict'>task weights span [\d.]+ to [\d.]+", learned)
