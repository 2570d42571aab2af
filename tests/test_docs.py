"""The documentation site builds with warnings as errors and covers what it must.

Builds with ``mkdocs build --strict`` (what ``make docs`` runs) into a temporary folder, once for
the module. mkdocs and mkdocstrings come with the ``docs`` extra, which ``make test`` installs;
without them these tests fail (they are not skipped) and say what to install.
"""

import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import metapt
from run_folders import load_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = [m for m in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python")
               if importlib.util.find_spec(m.split(".")[0]) is None or importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"the docs build needs {missing}: pip install -e '.[docs]' (make test installs it)")
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "WARNING" not in res.stderr, res.stderr[-4000:]
    return out


def _page(site: Path, name: str) -> str:
    return (site / f"{name}.html").read_text()  # use_directory_urls: false, so build/docs opens from disk


def test_every_cli_command_is_on_the_cli_page_with_its_help(site):
    import click
    import typer

    from metapt.cli import app

    page = _page(site, "cli")
    group = typer.main.get_command(app)
    with click.Context(group, info_name="metapt") as ctx:
        names = group.list_commands(ctx)
        assert len(names) >= 5
        for name in names:
            command = group.get_command(ctx, name)
            assert f"metapt {name}" in page, name
            summary = (command.help or "").strip().splitlines()[0]
            assert html.escape(summary, quote=False) in page, (name, summary)
            for param in command.params:
                for opt in getattr(param, "opts", []):
                    if opt.startswith("--"):
                        assert opt in page, (name, opt)


@pytest.mark.parametrize("example", ["task_weighting.py", "simclr_noise.py", "hypergradient.py"])
def test_examples_page_shows_each_example_file_verbatim(site, example):
    page = html.unescape(_page(site, "examples"))
    for line in (ROOT / "examples" / example).read_text().splitlines():
        assert line in page, (example, line)


def test_quick_start_is_example_one(site):
    page = html.unescape((site / "index.html").read_text())
    assert "class TaskWeighting(metapt.MetaProblem):" in page and "trainer.run_until(600)" in page


def test_api_reference_documents_every_public_name(site):
    ids = set()
    for page in (site / "reference").rglob("*.html"):
        ids |= set(re.findall(r'id="(metapt[\w.]*)"', page.read_text()))
    documented = {i.rsplit(".", 1)[-1] for i in ids}
    missing = [name for name in metapt.__all__ if name not in documented]
    assert not missing, f"not in the API reference: {missing}"
    for method in ("run_until", "snapshot", "state_dict"):
        assert f"metapt.MetaPretrainer.{method}" in ids, method
    assert "metapt.MetaProblem.pretrain_batch" in ids


def test_the_guide_states_the_batch_index_contract(site):
    page = html.unescape(_page(site, "guide"))
    for stream in ("pretrain_batch(s)", "finetune_batch(m * head_steps + c)",
                   "finetune_batch((m * batches + j) * max(unroll_steps, 1) + k)",
                   "metaval_batch(m * batches + j)"):
        assert stream in page, stream


def test_nav_links_open_from_disk(site):
    index = (site / "index.html").read_text()
    for name in ("guide", "examples", "math", "cli", "config"):
        assert f'href="{name}.html"' in index, name
        assert (site / f"{name}.html").is_file(), name


def _hooks():
    return load_file("docs_hooks", ROOT / "docs" / "hooks.py")


def test_config_reference_lists_every_key_with_its_default_and_meaning(site):
    from metapt.config import JOBS

    page = html.unescape(_page(site, "config"))
    hooks = _hooks()
    for job in JOBS:
        rows = list(hooks.config_rows(JOBS[job]))
        assert len(rows) > 20, job
        for key, default, meaning in rows:
            assert meaning, f"{job}: {key} has no meaning; document it in its class's Attributes: docstring"
            assert key in page, key
    # the defaults shown are the schema's: a job's own section defaults, e.g. the synthetic job's PT steps
    assert ("pretrain.steps", "1000") in {(k, d) for k, d, _ in hooks.config_rows(JOBS["synthetic"])}
    assert ("meta.estimator.kind", '"unrolled"') in {(k, d) for k, d, _ in hooks.config_rows(JOBS["molecules"])}


def test_every_exit_status_of_the_cli_is_in_the_table(site):
    codes = {int(c) for c in re.findall(r"_fail\(.*?, (\d+)\)$", (ROOT / "src/metapt/cli.py").read_text(), re.M | re.S)}
    codes |= {0, 1, 2}
    assert {3, 4, 130, 143} <= codes
    page = html.unescape(_page(site, "cli"))
    table = page.split('id="exit-status"', 1)[1].split('id="every-command"', 1)[0]
    for code in codes:
        assert f"<td>{code}</td>" in table, code
