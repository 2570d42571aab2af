"""A run's results, summarised: scores per method (mean ± 95 % CI), paired gains, seed agreement
of the learned φ, ``summary.json``/``summary.md`` and the shared plots.

The evaluation rows (one per method, pre-training seed, mode, label fraction and fine-tuning
seed) come from :func:`metapt.runner.run_experiment`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .atomic import write_text_atomic
from .domain import Domain, Method
from .evaluation import EvalConfig, mean_ci95, nonfinite, seed_agreement
from .metrics import read_jsonl
from .plots import plot_bars, plot_curves
from .problem import Params
from .runs import RunFolder
from .schema import jsonable

__all__ = ["aggregate", "agreement", "gains", "signal", "summary_markdown", "write_plots", "write_summary"]


def aggregate(rows: list[dict[str, Any]], methods: Sequence[Method], ev: EvalConfig,
               pt_seeds: Sequence[int]) -> dict[str, Any]:
    """Mean ± 95 % CI per method, mode and label fraction: over fine-tuning seeds with one
    pre-training seed; over pre-training seeds (of each one's mean over fine-tuning seeds) with several."""
    out: dict[str, Any] = {}
    for method in methods:
        for mode in ev.modes():
            for fraction in ev.label_fractions:
                mine = [r for r in rows if (r["method"], r["mode"], r["fraction"]) == (method.name, mode, fraction)]
                tests = [r["test"] for r in mine]
                cell = {"test": tests, "valid": [r["valid"] for r in mine],
                        "best_epoch": [r["best_epoch"] for r in mine], "nonfinite": nonfinite(tests)}
                if len(pt_seeds) > 1:
                    per_seed = [mean_ci95([r["test"] for r in mine if r["pt_seed"] == s])[0] for s in pt_seeds]
                    cell["per_pretrain_seed"] = per_seed
                    cell["mean"], cell["ci95"] = mean_ci95(per_seed)
                else:
                    cell["mean"], cell["ci95"] = mean_ci95(tests)
                out.setdefault(method.label, {}).setdefault(mode, {})[f"{fraction:g}"] = cell
    return out


def gains(rows: list[dict[str, Any]], domain: Domain, methods: Sequence[Method], ev: EvalConfig,
           pt_seeds: Sequence[int]) -> dict[str, Any]:
    """Paired differences: per fine-tuning seed (same label subset, head init and batch order) with
    one pre-training seed; per pre-training seed (of the per-seed means) with several."""
    names = {m.name for m in methods}
    table = {(r["method"], r["pt_seed"], r["mode"], r["fraction"], r["seed"]): r["test"] for r in rows}
    seeds = pt_seeds if len(pt_seeds) > 1 else [None]
    out: dict[str, Any] = {}
    for better, base in domain.gains:
        if better not in names or base not in names:
            continue
        label = f"{domain.methods[better].label} − {domain.methods[base].label}"
        for mode in ev.modes():
            for fraction in ev.label_fractions:
                per_ft = {p: [table[(better, p, mode, fraction, s)] - table[(base, p, mode, fraction, s)]
                              for s in range(ev.seeds)] for p in seeds}
                diffs = per_ft[None] if len(seeds) == 1 else [mean_ci95(per_ft[p])[0] for p in seeds]
                mean, ci = mean_ci95(diffs)
                out.setdefault(label, {}).setdefault(mode, {})[f"{fraction:g}"] = {
                    "mean": mean, "ci95": ci, "diff": diffs, "nonfinite": nonfinite(diffs)}
    return out


def agreement(phis: Mapping[str, list[Params]]) -> dict[str, Any]:
    """Per learned method and φ entry, the Spearman agreement of the pre-training seeds' φ
    (:func:`metapt.evaluation.seed_agreement`); empty with one pre-training seed."""
    out: dict[str, Any] = {}
    for label, runs in phis.items():
        if len(runs) < 2:
            continue
        for key in runs[0]:
            if runs[0][key].numel() >= 2:
                vectors = [r[key].detach().double().cpu().reshape(-1).numpy() for r in runs]
                out.setdefault(label, {})[key] = seed_agreement(vectors)
    return out


def signal(signals: Mapping[str, list[Mapping[str, float]]]) -> dict[str, Any]:
    """Per learned method, :func:`metapt.diagnostics.phase_signal` over its pre-training seeds: the
    mean pairwise cosine of independent hypergradient draws at the end of each phase, and the draws
    that must be averaged for cosine 0.5 at that mean (inf: no expected direction)."""
    from .diagnostics import draws_for_cosine

    out: dict[str, Any] = {}
    for label, runs in signals.items():
        cos = [float(r["mean_pairwise_cos"]) for r in runs]
        split = [float(r["split_half_cos"]) for r in runs]
        mean = float(np.mean(cos))
        out[label] = {"pairwise_cos": mean, "per_seed": cos, "split_half_cos": float(np.mean(split)),
                      "draws_for_half": draws_for_cosine(mean, 0.5), "draws": int(runs[0]["draws"]), "seeds": len(runs)}
    return out


#: Adam's first moment on φ (β₁ = 0.9) averages about this many meta-steps' hypergradients
ADAM_STEPS_AVERAGED = 10


def _signal_line(label: str, s: Mapping[str, Any]) -> str:
    c, n = s.get("pairwise_cos"), s.get("draws_for_half")
    if c is None or not math.isfinite(c):
        return f"Signal, {label}: not measured."
    over = f", mean over {s['seeds']} pre-training seeds" if s.get("seeds", 1) > 1 else ""
    head = (f"Signal, {label}: {s['draws']} independent draws of the meta-step's hypergradient at the end of "
            f"pre-training agree at cosine {c:.2f}{over}")
    if n is None or not math.isfinite(n):
        return head + ": no expected direction, φ follows batch noise."
    verdict = ("a signal a few meta-steps average out" if n <= ADAM_STEPS_AVERAGED else
               f"mostly batch noise: Adam on φ averages about {ADAM_STEPS_AVERAGED} meta-steps")
    draws = "one draw reaches" if n < 1.5 else f"about {n:.0f} draws must be averaged for"
    return head + f"; {draws} cosine 0.5 ({verdict})."


# ---- summary and plots ------------------------------------------------------------------------


def write_summary(folder: RunFolder, summary: dict[str, Any]) -> None:
    """``summary.json`` (strict JSON: non-finite numbers become null) and ``summary.md``."""
    write_text_atomic(folder.path / "summary.json", json.dumps(jsonable(summary), indent=2, allow_nan=False))
    write_text_atomic(folder.path / "summary.md", summary_markdown(summary))


def _cell(v: Mapping[str, Any]) -> str:
    mean, ci, bad = v.get("mean"), v.get("ci95"), v.get("nonfinite", 0)
    if mean is None or not math.isfinite(mean):
        text = "n/a"
    else:
        text = f"{mean:.3f}" + (f" ± {ci:.3f}" if ci is not None and math.isfinite(ci) else "")
    return text + (f" ({bad} non-finite)" if bad else "")


def _rho(a: Mapping[str, Any]) -> str:
    mean, loo, ci = a.get("pairwise_mean"), a.get("leave_one_out_mean"), a.get("leave_one_out_ci95")
    if mean is None or not math.isfinite(mean):
        return "undefined (a seed's φ did not move)"
    text = f"{mean:.2f} over pairs; each seed against the others' mean {loo:.2f}"
    return text + (f" ± {ci:.2f} (95 % CI)" if ci is not None and math.isfinite(ci) else "")


def summary_markdown(summary: Mapping[str, Any]) -> str:
    over = "pre-training seeds" if summary["config"]["pretrain"].get("seeds", 1) > 1 else "fine-tuning seeds"
    lines = [f"# {summary.get('job', 'run')}: downstream test scores, mean ± 95 % CI over {over}", ""]
    for setting, res in summary["settings"].items():
        metric = "AUROC" if res["metric"] == "auroc" else "MSE (lower is better)"
        columns = [(mode, fr) for by_mode in list(res["scores"].values())[:1] for mode, by_fr in by_mode.items()
                   for fr in by_fr]
        head = ["method"] + [f"{mode}, {float(fr):.0%} labels" if len({f for _, f in columns}) > 1 else mode
                             for mode, fr in columns]
        lines += [f"## {setting}: test {metric}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for method, by_mode in res["scores"].items():
            lines.append(f"| {method} | " + " | ".join(_cell(by_mode[m][f]) for m, f in columns) + " |")
        for label, by_mode in res.get("gains", {}).items():
            lines.append(f"| *{label}* (paired) | " + " | ".join(_cell(by_mode[m][f]) for m, f in columns) + " |")
        cells = [c for by_mode in res["scores"].values() for by_fr in by_mode.values() for c in by_fr.values()]
        if cells and all(c.get("nonfinite", 0) == len(c["test"]) for c in cells):
            lines += ["", f"**Every score of {setting} is NaN**: no fine-tuning run could be scored (e.g. a "
                      "split with only one class); see summary.json for the counts."]
        n_seeds = summary["config"]["pretrain"].get("seeds", 1)
        for label, s in res.get("signal", {}).items():
            lines += ["", _signal_line(label, s)]
            if n_seeds == 1:
                lines += ["", f"Seed agreement, {label}: not measured with one pre-training seed "
                          "(`--set pretrain.seeds=3` or more measures it)."]
        for label, by_key in res.get("agreement", {}).items():
            for key, a in by_key.items():
                lines += ["", f"Seed agreement, {label} ({key}): Spearman ρ of the learned φ across "
                          f"{a['seeds']} pre-training seeds {_rho(a)}."]
        sizes = ", ".join(f"{k} {v}" for k, v in res["sizes"].items())
        lines += ["", f"Downstream examples: {sizes}. The epoch is chosen on 'valid'; test is read at that epoch.", ""]
    health = summary.get("pretraining", {})
    skipped = sum(int(h.get("skipped_meta_steps", 0)) for h in health.values())
    rejected = sum(int(h.get("rejected_heads", 0)) for h in health.values())
    meta_steps = sum(int(h.get("meta_steps", 0)) for h in health.values())
    pt = summary["config"]["pretrain"]
    n_pt = pt.get("seeds", 1)
    if n_pt > 1:
        seeds = f"Each method is pre-trained with {n_pt} seeds ({pt['seed']}–{pt['seed'] + n_pt - 1}): the CIs " \
                "and paired gains are over pre-training seeds, of each seed's mean over fine-tuning seeds."
    else:
        seeds = f"Each method is pre-trained once (seed {pt['seed']}): the CIs cover fine-tuning seeds only."
    capped = sum(int(h.get("inner_lr_capped", 0)) for h in health.values())
    lines.append(f"Meta-steps: {meta_steps}, skipped (unusable hypergradient): {skipped}, "
                 f"non-finite heads rejected: {rejected}. {seeds}")
    if capped:
        lines.append(f"Fine-tuning steps run below meta.inner_lr, at 1/λ of the head's curvature "
                     f"(meta.inner_lr_cap: auto): {capped}.")
    lines.append(f"Wall time: {summary.get('wall_seconds', float('nan'))} s.")
    return "\n".join(lines) + "\n"


def write_plots(domain: Domain, folder: RunFolder, summary: Mapping[str, Any]) -> None:
    """(Re)draw the run's plots from ``metrics.jsonl`` and the summary."""
    out = folder.path
    rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    keys = ["pt_loss", "meta_loss", "hypergrad_norm", "solver_residual"]
    keys += sorted({k for r in rows for k in r if k.startswith("phi/")})
    plot_curves(rows, keys, out / "losses.png", title="Pre-training and meta-learning")
    for setting, res in summary["settings"].items():
        methods = list(res["scores"])
        columns = [(mode, fr) for mode, by_fr in res["scores"][methods[0]].items() for fr in by_fr]
        metric = "test AUROC" if res["metric"] == "auroc" else "test MSE"
        series = {f"{mode} {float(fr):.0%}" if len(columns) > len({m for m, _ in columns}) else mode:
                  [(res["scores"][k][mode][fr]["mean"] if res["scores"][k][mode][fr]["mean"] is not None else math.nan,
                    res["scores"][k][mode][fr]["ci95"] if res["scores"][k][mode][fr]["ci95"] is not None else math.nan)
                   for k in methods] for mode, fr in columns}
        auroc = res["metric"] == "auroc"
        plot_bars(methods, series, out / f"scores_{_slug(setting)}.png",
                  ylabel=f"{metric}, {'higher' if auroc else 'lower'} is better\n(mean ± 95 % CI over seeds)",
                  title=f"{setting}: downstream {metric} per method", reference=(0.5, "chance (AUROC 0.5)") if auroc else None,
                  bounds=(0.0, 1.0) if auroc else None)
    domain.plots(out, summary)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)
