"""Every script in examples/ runs and does what its docstring promises; the README links example (1)."""

import statistics
import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_every_example_is_tested_here():
    tested = {"hypergradient.py", "simclr_noise.py", "task_weighting.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_hypergradient_matches_finite_differences_and_down_weights_corrupted_labels():
    ns = _run("hypergradient.py")
    h = ns["hypergrad"]["logits"]
    # independent check on more entries than the script prints: central differences of the
    # closed-form solution in float64, a corrupted example (0) and clean ones
    for i in (0, 57, 199):
        eps = 1e-5
        bump = torch.zeros_like(h)
        bump[i] = eps
        fd = (ns["meta_loss"]({"w": ns["solve"](bump)}) - ns["meta_loss"]({"w": ns["solve"](-bump)})) / (2 * eps)
        torch.testing.assert_close(h[i], fd, rtol=1e-6, atol=1e-12)
    assert ns["info"].solver.residual_norm < 1e-12
    corrupted = ns["corrupted"]
    for grad in (h, ns["hypergrad_ft"]["logits"]):  # positive: gradient descent lowers the weight
        assert grad[corrupted].mean() > 0 > grad[~corrupted].mean()


def _documented(text: str, *pages: str) -> None:
    """Each figure the docs quote is produced here: ``text`` must appear in every page named."""
    for page in pages:
        content = " ".join((ROOT / page).read_text().split())  # line breaks do not matter
        assert text in content, f"{page} should say {text!r}: re-measured by the test, update the page"


def _sci(x: float) -> str:
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa} × 10{str(int(exponent)).translate(str.maketrans('-0123456789', '⁻⁰¹²³⁴⁵⁶⁷⁸⁹'))}"


def test_task_weighting_down_weights_the_coin_flip(capsys):
    source = (EXAMPLES / "task_weighting.py").read_text()
    schedule = "schedule=metapt.MetaSchedule(interval=5),"
    assert source.count(schedule) == 1
    norms = []

    class Norms:
        def log(self, step, metrics):
            if "hypergrad_norm" in metrics:
                norms.append(metrics["hypergrad_norm"])

    ns = {"__name__": "__main__", "_norms": Norms()}
    exec(compile(source.replace(schedule, schedule + " loggers=[_norms],"), "task_weighting", "exec"), ns)
    result = ns["result"]
    w = dict(zip(ns["tasks"].names, ns["weights"].tolist()))
    assert w["coin"] < 0.9 < 1.2 < min(w["a"], w["b"]), w
    # the figures README and docs quote
    _documented(f"lowest ({w['coin']:.2f}; the other two {w['a']:.2f} and {w['b']:.2f})",
                "README.md", "docs/examples.md")
    norms.sort()
    _documented(f"its norm runs from {_sci(norms[0])} to {_sci(norms[-1])}, median {_sci(statistics.median(norms))}",
                "docs/guide.md")
    _documented(f"the norm runs from {_sci(norms[0])} to {_sci(norms[-1])}, median {_sci(statistics.median(norms))}",
                "docs/math.md")
    assert result.step == 600 and result.meta_step_count == 120 and result.skipped == 0
    # the model the user passed in now holds the pre-trained θ
    for k, v in ns["net"].state_dict().items():
        assert torch.equal(v, result.params[k])
    assert "coin" in capsys.readouterr().out


def test_simclr_noise_moves_noise_off_informative_features_onto_nuisance_ones():
    ns = _run("simclr_noise.py")
    std, informative = ns["std"], ns["informative"]
    assert std[informative].max() < std[~informative].min(), std
    assert std[informative].max() < 0.5 and std[~informative].mean() > 1.5, std  # both moved from 1


def test_readme_library_section_points_at_example_one_and_shows_no_copy_of_it():
    # the README is the front door: it links the example (the docs' quick start includes the file
    # itself, tests/test_docs.py) instead of holding a copy that could drift from it
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The library\n", 1)[1].split("\n## ", 1)[0]
    assert "[examples/task_weighting.py](examples/task_weighting.py)" in section
    assert "```python" not in section


@pytest.mark.parametrize("name", ["task_weighting.py", "simclr_noise.py", "hypergradient.py"])
def test_examples_use_only_the_public_api(name):
    # a user copies these without opening metapt's source: no private names, no domains
    text = (EXAMPLES / name).read_text()
    assert "metapt._" not in text and "metapt.domains" not in text and ".run(" not in text


def test_task_weighting_control_backwards_raises_the_coin_flip():
    # the control the guide documents: the same script with maximize=True on φ's optimiser
    source = (EXAMPLES / "task_weighting.py").read_text()
    original = "torch.optim.Adam(φ, lr=0.05)"
    assert source.count(original) == 1
    ns = {"__name__": "__main__"}
    exec(compile(source.replace(original, "torch.optim.Adam(φ, lr=0.05, maximize=True)"), "control", "exec"), ns)
    w = dict(zip(ns["tasks"].names, ns["weights"].tolist()))
    assert w["coin"] > 1.2 > 0.8 > max(w["a"], w["b"]), w
    _documented(f"(to {w['coin']:.2f}, the other two down to {w['a']:.2f} and {w['b']:.2f};", "docs/guide.md")
