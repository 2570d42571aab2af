"""A run as one self-contained HTML page, and several runs side by side.

The page holds the summary tables, every PNG of the run folder embedded as
base64 (losses, hypergradient norm and solver residual over steps, learned
meta-parameters, AUROC bars), the resolved configuration and the run's health
(meta-steps skipped, checkpoints). It needs no server and no other file.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import markdown
import yaml

from .atomic import write_text_atomic
from .runs import RunFolder

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; } th { background: #f4f4f4; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; } pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
.muted { color: #777; } .verdict { background: #f3f6fb; border-left: 3px solid #4c72b0; padding: .4em .8em; }
h3 { font-size: 1.05em; margin-bottom: .2em; }
table.phi td:nth-child(2) { font-variant-numeric: tabular-nums; text-align: right; }
div.bar { background: #4c72b0; height: .7em; min-width: 1px; }
table.phi td:nth-child(3) { width: 12em; }
"""

# The order figures appear in; anything else follows alphabetically.
_FIGURE_ORDER = ("losses", "scores", "task_weights", "warp_magnitude", "warp_examples")


def write_report(folder: RunFolder) -> Path:
    """Write ``report.html`` in the run folder from what the folder holds; returns its path."""
    summary_md = _read(folder.path / "summary.md")
    config = _read(folder.config_file)
    summary = json.loads(_read(folder.path / "summary.json") or "{}")
    title = f"metapt run: {folder.path.name}"
    parts = [f"<h1>{html.escape(title)}</h1>"]
    job = (yaml.safe_load(config) or {}).get("job", "?") if config else "?"
    parts.append(f"<p class='muted'>job <b>{html.escape(str(job))}</b> · folder {html.escape(str(folder.path))}"
                 f"{_wall(summary)}</p>")
    parts.append("<h2>Results</h2>")
    for line in results_verdicts(summary):
        parts.append(f"<p class='verdict'>{html.escape(line)}</p>")
    parts.append(markdown.markdown(summary_md, extensions=["tables"]) if summary_md else
                 "<p>No summary yet: the run has not finished.</p>")
    figures = sorted(folder.path.glob("*.png"), key=_figure_rank)
    if figures:
        parts.append("<h2>Plots</h2>")
        for png in figures:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(png.stem)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(_caption(png.stem))}</figcaption></figure>")
    learned = {setting: res["learned"] for setting, res in summary.get("settings", {}).items() if res.get("learned")}
    if learned:
        parts.append("<h2>Learned meta-parameters</h2>")
        weights = any("weight" in k for by_method in learned.values() for v in by_method.values()
                      if isinstance(v, dict) for k in v)
        parts.append("<p class='muted'>φ at the end of pre-training, per setting and method"
                     + (" (task weights: 1 is uniform)" if weights else "") + ".</p>")
        for setting, by_method in learned.items():
            for method, value in by_method.items():
                parts.append(f"<h3>{html.escape(setting)} · {html.escape(method)}</h3>")
                parts.append(_phi_tables(value))
    parts.append("<h2>Health</h2>")
    parts.append(_health(folder, summary))
    diagnostics = folder.path / "diagnostics.json"
    if diagnostics.is_file():  # written by `metapt diagnose`
        parts.append("<h2>Hypergradient health</h2>")
        parts.append(_hypergradient_health(diagnostics))
    parts.append("<h2>Configuration</h2>")
    parts.append(f"<pre>{html.escape(config or '(no config.yaml)')}</pre>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    path = folder.path / "report.html"
    write_text_atomic(path, page)
    return path


def results_verdicts(summary: dict) -> list[str]:
    """Per setting: did each meta-learned method help, by its paired gains' 95 % CIs; and was there a
    signal to learn from (the phases' hypergradient draws) that the pre-training seeds agreed on?"""
    lines = []
    for setting, res in summary.get("settings", {}).items():
        higher = res.get("metric", "auroc") == "auroc"
        said = []
        for label, by_mode in res.get("gains", {}).items():
            if "meta" not in label.lower():
                continue
            cells = []
            for mode, by_fraction in by_mode.items():
                for fraction, g in by_fraction.items():
                    mean, ci = g.get("mean"), g.get("ci95")
                    where = mode + ("" if len(by_fraction) == 1 else f", {float(fraction):.0%} labels")
                    if mean is None or ci is None or not (math.isfinite(mean) and math.isfinite(ci)):
                        cells.append(f"no CI ({where})")
                    elif abs(mean) > ci:
                        cells.append(f"{'better' if (mean > 0) == higher else 'worse'} by {abs(mean):.3g} ± {ci:.2g} "
                                     f"({where})")
                    else:
                        cells.append(f"indistinguishable ({where})")
            said.append(f"{label}: " + ", ".join(cells))
        if said:
            lines.append(f"Verdict, {setting} (paired 95 % CIs): " + "; ".join(said) + ".")
        learnable = []  # beside "did it help": was there anything to learn, and did the seeds learn it alike?
        for label, sig in res.get("signal", {}).items():
            c, n = sig.get("pairwise_cos"), sig.get("draws_for_half")
            if c is None or not math.isfinite(c):
                continue
            text = f"{label}: hypergradient draws agree at cosine {c:.2f} (" + (
                f"about {n:.0f} draws for 0.5" if n is not None and math.isfinite(n) else "no expected direction") + ")"
            for key, a in res.get("agreement", {}).get(label, {}).items():
                rho = a.get("leave_one_out_mean")
                if rho is not None and math.isfinite(rho):
                    ci = a.get("leave_one_out_ci95")
                    text += f", seeds' {key} agree at ρ {rho:.2f}" + (
                        f" ± {ci:.2f}" if ci is not None and math.isfinite(ci) else "")
            learnable.append(text)
        if learnable:
            lines.append(f"Signal, {setting}: " + "; ".join(learnable) + ".")
    return lines


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    return f"{value:.4g}" if math.isfinite(value) else "n/a"


def _words(key: str) -> str:
    return html.escape(key.replace("_", " "))


def _phi_tables(value: Any) -> str:
    """Learned φ as named tables: scalar summaries in one, each name → number mapping in its own
    (sorted, highest first, with a bar), lists of one length side by side, indexed."""
    if not isinstance(value, dict):
        return f"<p>{_number(value)}</p>"
    out = []
    spans = []
    stats = {"mean", "std", "min", "max", "median"}
    for key, v in value.items():
        if isinstance(v, dict) and v and set(v) <= stats:  # a summary of many entries, not one per name
            if "min" in v and "max" in v:
                spans.append(f"{key.replace('_', ' ')} span {v['min']:.3g} to {v['max']:.3g}")
            continue
        numbers = list(v.values()) if isinstance(v, dict) else v if isinstance(v, list) else []
        numbers = [x for x in numbers if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
        if len(numbers) > 1:
            spans.append(f"{key.replace('_', ' ')} span {min(numbers):.3g} to {max(numbers):.3g} ({len(numbers)} entries)")
    if spans:
        note = " (1 is uniform)" if any("weight" in k for k in value) else ""
        out.append(f"<p class='verdict'>{html.escape('; '.join(spans) + note)}.</p>")
    scalars = {k: v for k, v in value.items() if not isinstance(v, (dict, list))}
    if scalars:
        out.append("<table class='phi'><tr><th>quantity</th><th>value</th></tr>"
                   + "".join(f"<tr><td>{_words(k)}</td><td>{_number(v)}</td></tr>" for k, v in scalars.items())
                   + "</table>")
    for key, mapping in ((k, v) for k, v in value.items() if isinstance(v, dict)):
        numbers = {n: v for n, v in mapping.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if len(numbers) != len(mapping):
            out.append(f"<p>{_words(key)}</p><pre>{html.escape(json.dumps(mapping, indent=1))}</pre>")
            continue
        if set(numbers) <= stats:  # summary statistics, in their own order
            out.append(f"<table class='phi'><tr><th>{_words(key)}</th><th>value</th></tr>"
                       + "".join(f"<tr><td>{_words(n)}</td><td>{_number(v)}</td></tr>" for n, v in numbers.items())
                       + "</table>")
            continue
        top = max((abs(v) for v in numbers.values() if math.isfinite(v)), default=1.0) or 1.0
        rows = "".join(f"<tr><td>{html.escape(str(n))}</td><td>{_number(v)}</td><td><div class='bar' "
                       f"style='width:{max(0.0, 100 * abs(v) / top) if math.isfinite(v) else 0:.0f}%'></div></td></tr>"
                       for n, v in sorted(numbers.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else 0))
        out.append(f"<table class='phi'><tr><th>{_words(key)}: name</th><th>value</th><th></th></tr>{rows}</table>")
    lists = {k: v for k, v in value.items() if isinstance(v, list)}
    for length in sorted({len(v) for v in lists.values()}):
        group = {k: v for k, v in lists.items() if len(v) == length}
        head = "<tr><th>#</th>" + "".join(f"<th>{_words(k)}</th>" for k in group) + "</tr>"
        rows = "".join("<tr><td>" + str(i) + "</td>" + "".join(f"<td>{_number(v[i])}</td>" for v in group.values())
                       + "</tr>" for i in range(length))
        out.append(f"<table class='phi'>{head}{rows}</table>")
    return "".join(out)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _wall(summary: dict) -> str:
    seconds = summary.get("wall_seconds")
    return f" · wall time {seconds / 60:.1f} min" if isinstance(seconds, (int, float)) else ""


def _figure_rank(path: Path) -> tuple[int, str]:
    for i, prefix in enumerate(_FIGURE_ORDER):
        if path.stem.startswith(prefix):
            return i, path.stem
    return len(_FIGURE_ORDER), path.stem


def _caption(stem: str) -> str:
    captions = {"losses": "Pre-training and meta-learning over PT steps: one panel per logged quantity that changes "
                          "(the ones that stay constant are named under the panels), one line per phase",
                "task_weights": "Learned task weights (1 = uniform)", "scores": "Downstream test score per method",
                "warp_magnitude": "Warp magnitude over steps", "warp_examples": "Examples of the learned warp"}
    for prefix, text in captions.items():
        if stem.startswith(prefix):
            return text + (f" ({stem[len(prefix) + 1:]})" if stem != prefix else "")
    return stem.replace("_", " ")


def _health(folder: RunFolder, summary: dict) -> str:
    items = []
    for phase, h in summary.get("pretraining", {}).items():
        skipped, rejected = int(h.get("skipped_meta_steps", 0)), int(h.get("rejected_heads", 0))
        text = (f"{phase}: {h.get('meta_steps', 0)} meta-steps, {skipped} skipped (non-finite hypergradient or "
                f"diverging solver), {rejected} non-finite heads rejected")
        if skipped:
            text += " — see `metapt diagnose` and the estimator options (meta.estimator) in the README"
        if int(h.get("inner_lr_capped", 0)):
            text += (f"; {int(h['inner_lr_capped'])} fine-tuning steps ran below meta.inner_lr, at 1/λ of the "
                     "head's curvature (meta.inner_lr_cap: auto)")
        items.append(text)
    for setting, res in summary.get("settings", {}).items():
        bad = sum(int(v.get("nonfinite", 0)) for by_mode in res.get("scores", {}).values()
                  for by_fraction in by_mode.values() for v in by_fraction.values())
        if bad:
            items.append(f"{setting}: {bad} fine-tuning run(s) scored NaN (e.g. a split with one class); "
                         "they are left out of the means and CIs")
    checkpoints = folder.checkpoints()
    items.append(f"checkpoints kept: {len(checkpoints)}" + (f" (newest {checkpoints[-1].name})" if checkpoints else ""))
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


# ---- several runs ---------------------------------------------------------------------------


def scores(summary: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Every headline number of a run summary as ``{row label: (mean, ci95)}``, whatever its job."""
    out: dict[str, tuple[float, float]] = {}
    for setting, res in summary.get("settings", {}).items():
        metric = "test AUROC" if res.get("metric", "auroc") == "auroc" else "test MSE"
        for method, by_mode in res.get("scores", {}).items():
            for mode, by_fraction in by_mode.items():
                for fraction, v in by_fraction.items():
                    labels = "" if len(by_fraction) == 1 else f" · {float(fraction):.0%} labels"
                    out[f"{setting} · {method} · {mode}{labels} · {metric}"] = (
                        math.nan if v.get("mean") is None else v["mean"], math.nan if v.get("ci95") is None else v["ci95"])
    return out


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def compare(folders: Sequence[RunFolder]) -> tuple[list[str], list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """(run names, score rows, differing config rows), each row ``(label, one cell per run)``."""
    from .config import renamed

    names = [f.path.name for f in folders]
    all_scores, configs = [], []
    for folder in folders:
        summary = json.loads(_read(folder.path / "summary.json") or "{}")
        all_scores.append(scores(summary))
        configs.append(_flat(renamed(yaml.safe_load(_read(folder.config_file)) or {}, quiet=True)))  # meta.solver too
    labels = list(dict.fromkeys(label for s in all_scores for label in s))
    rows = [(label, [_cell(s.get(label)) for s in all_scores]) for label in labels]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    diffs = [(k, [str(c.get(k, "—")) for c in configs]) for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    return names, rows, diffs


def _cell(value: tuple[float, float] | None) -> str:
    if value is None:
        return "—"
    mean, ci = value
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.4f}" + (f" ± {ci:.4f}" if ci is not None and math.isfinite(ci) else "")


def compare_markdown(folders: Sequence[RunFolder]) -> str:
    names, rows, diffs = compare(folders)
    head = "| | " + " | ".join(names) + " |\n|---" + "|---" * len(names) + "|\n"
    text = "# Runs compared\n\n" + head + "".join(f"| {l} | " + " | ".join(c) + " |\n" for l, c in rows)
    if diffs:
        text += "\n## Configuration differences\n\n" + head
        text += "".join(f"| {k} | " + " | ".join(c) + " |\n" for k, c in diffs)
    else:
        same = all(len(set(cells)) == 1 for _, cells in rows)
        text += ("\nno differences: the configurations are identical"
                 + (" and so are the scores\n" if same else "; the scores differ\n"))
    return text


def _hypergradient_health(path: Path) -> str:
    """The table of ``metapt diagnose`` (lookahead agreement, SNR, curvature, cost), from diagnostics.json."""
    from .run_diagnosis import format_table

    try:
        result = json.loads(_read(path))
        text = f"{result.get('source', '')}\n\n{format_table(result)}"
    except (ValueError, KeyError, TypeError) as err:
        return f"<p>{html.escape(str(path))} could not be read ({html.escape(type(err).__name__)})</p>"
    return markdown.markdown(text, extensions=["tables"])
