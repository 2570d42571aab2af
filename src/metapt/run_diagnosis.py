"""``metapt diagnose``: the hypergradient measurements at a run folder's state, and their tables.

:func:`diagnose_run` finds the state (a checkpoint's trainer, or a finished phase's recorded θ and
φ), rebuilds the trainer as the run built it and runs :func:`metapt.diagnostics.diagnose`;
:func:`format_text`, :func:`format_table` and :func:`verdict` lay the result out.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .diagnostics import DiagnoseOptions, default_estimators, diagnose, draws_for_cosine, estimator_configs

__all__ = ["config_text", "diagnose_run", "format_table", "format_text", "verdict"]


def config_text(config: Mapping[str, Any]) -> str:
    """``{kind: cg, max_iter: 5}``: a ``meta.estimator`` value as it is written in YAML."""
    def value(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    return "{" + ", ".join(f"{k}: {value(v)}" for k, v in config.items()) + "}"


def format_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of one :func:`diagnose` result (``metapt diagnose --format md``)."""
    opts = result["options"]
    configs = result.get("configs", {})
    own = result.get("own")
    lines = [f"state: {result.get('state') or 'PT step ' + str(result['step'])}; lookahead T = {opts['horizon']}, {opts['directions']} random "
             f"directions + own, ε = {opts['epsilon']}, {opts['val_pairs']} FT/val pairs; "
             f"Hessian λmax ≈ {_fmt(result['curvature'] and result['curvature']['lambda_max'])}, "
             f"λmin ≈ {_fmt(result['curvature'] and result['curvature']['lambda_min'])}",
             "",
             "| estimator | meta.estimator | sign agreement (exact) | sign agreement (FD) | cos(exact T-step) | own-direction FD | SNR | mean pair cos | cost (PT steps) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["estimators"].items():
        shown = f"**{name}** (this run's)" if name == own else name
        lines.append(f"| {shown} | `{config_text(configs[name]) if name in configs else '?'}` | "
                     f"{_fmt(r.get('sign_agreement_exact'))} | {_fmt(r['sign_agreement_fd'])} | "
                     f"{_fmt(r.get('cos_exact'))} | {_fmt(r['own_fd'])} | {_fmt(r['snr'])} | "
                     f"{_fmt(r['mean_pairwise_cos'])} | {_fmt(r['cost_pt_steps'])} |")
    if result.get("truth"):
        t = result["truth"]
        lines += ["", f"truth check (random directions): FD vs exact T-step derivative correlation "
                      f"{_fmt(t['fd_vs_exact_correlation'])}, sign agreement {_fmt(t['fd_vs_exact_sign_agreement'])}"]
    lines += ["", f"verdict: {verdict(result)}"]
    return "\n".join(lines)


def verdict(result: Mapping[str, Any]) -> str:
    """One sentence: does the run's estimator follow the exact lookahead derivative, and is there signal?"""
    rows = result["estimators"]
    name = result.get("own") if result.get("own") in rows else "unrolled_T1" if "unrolled_T1" in rows else next(iter(rows))
    r = rows[name]
    cos, sign, pair = r.get("cos_exact"), r.get("sign_agreement_exact"), r.get("mean_pairwise_cos")
    who = "this run's estimator" if name == result.get("own") else "the default estimator"
    configs = result.get("configs", {})
    if name not in default_estimators(1.0, result["options"]["horizon"]) and name in configs:
        name = config_text(configs[name])
    if cos is None or not math.isfinite(cos):
        return f"{who} ({name}) could not be compared with the exact lookahead derivative"
    follows = ("follows" if cos >= 0.7 else "partly follows" if cos >= 0.3 else "does not follow")
    text = (f"{who} ({name}) {follows} the exact {result['options']['horizon']}-step derivative "
            f"(cos {cos:.2f}, signs {sign:.0%} of directions)")
    if pair is not None and math.isfinite(pair):
        text += ("; its draws agree with each other (pair cos " if pair >= 0.5 else
                 "; its draws are mostly batch noise (pair cos ") + f"{pair:.2f})"
        need = draws_for_cosine(pair)
        text += (f"; there is a signal to learn from here: about {need:.0f} draws average to cosine 0.5"
                 if math.isfinite(need) else "; no expected direction here: the objective is flat at this state")
    cost = r.get("cost_pt_steps") or math.inf
    better = [(o.get("cos_exact"), n) for n, o in rows.items()
              if n != name and o.get("cost_pt_steps", math.inf) <= 2 * cost
              and o.get("cos_exact") is not None and math.isfinite(o["cos_exact"]) and o["cos_exact"] > cos + 0.2]
    if better:
        best_cos, best = max(better)
        text += f"; {best} does better (cos {best_cos:.2f}) for at most twice the cost"
    return text + "."


def format_text(result: Mapping[str, Any], width: int = 80) -> str:
    """The 80-column plain-text layout of ``metapt diagnose``: the key figures per estimator, the
    config of each below, and a one-line verdict (``--format md`` gives every column)."""
    import textwrap

    opts = result["options"]
    own = result.get("own")
    curvature = result.get("curvature") or {}
    head = (f"state: {result.get('state') or 'PT step ' + str(result['step'])}. Lookahead T = {opts['horizon']} "
            f"PT steps, {opts['directions']} random directions + each estimator's own, "
            f"{opts['val_pairs']} FT/val pairs; Hessian λ ∈ [{_fmt(curvature.get('lambda_min'))}, "
            f"{_fmt(curvature.get('lambda_max'))}].")
    lines = textwrap.wrap(head, width) + [""]
    def num(x: Any, digits: int = 2) -> str:
        return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.1e}"

    lines.append(f"  {'estimator':<26}{'signs':>7}{'cos':>7}{'SNR':>9}{'pair cos':>10}{'cost':>7}")
    for name, r in result["estimators"].items():
        mark = "*" if name == own else " "
        lines.append(f"{mark} {name[:26]:<26}{num(r.get('sign_agreement_exact')):>7}{num(r.get('cos_exact')):>7}"
                     f"{num(r.get('snr')):>9}{num(r.get('mean_pairwise_cos')):>10}{num(r.get('cost_pt_steps'), 1):>7}")
    lines += ["", "signs: share of directions in which the estimate has the sign of the exact",
              "T-step derivative; cos: cosine with it; SNR and pair cos: how well independent",
              "draws agree; cost: one estimate's time in plain PT steps."]
    if own:
        lines.append("* this run's estimator (its meta.estimator)")
    configs = result.get("configs", {})
    if configs:
        lines += ["", "meta.estimator of each:"]
        for name in result["estimators"]:
            if name in configs:
                lines += textwrap.wrap(f"{name}: {config_text(configs[name])}", width, initial_indent="  ",
                                       subsequent_indent="      ")
    lines += [""] + textwrap.wrap(f"verdict: {verdict(result)}", width)
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


# ---- a run folder ------------------------------------------------------------------------------

def diagnose_run(run_dir: str | Path, *, phase: str | None = None, options: DiagnoseOptions | None = None,
                 warm_steps: int = 50, console: Any = None) -> dict[str, Any]:
    """:func:`diagnose` at a checkpointed state of a run folder; writes ``RUN/diagnostics.json``.

    The state is the newest checkpoint that holds a pre-training phase's trainer (of ``phase``,
    ``SETTING/METHOD``, if given). A finished run keeps only each phase's θ and φ: the trainer is
    then rebuilt from the recorded θ and φ of the newest learned phase (or ``phase``), and
    ``warm_steps`` PT steps with φ fixed, the head trained alongside, re-estimate Adam's moments
    and the head before measuring. The problem is rebuilt through the job's domain
    (:func:`metapt.domains.domain`), the lookahead horizon is the run's ``meta.interval``.

    Raises:
        metapt.errors.UserError: no usable state in the folder.
    """
    from .config import load_config
    from .domains import domain as domain_of
    from .errors import UserError
    from .atomic import write_text_atomic
    from .runs import RunFolder
    from .runner import build_trainer, parse_phase

    folder = RunFolder.open(run_dir)
    config = load_config(folder.config_file)
    dom = domain_of(config.job)
    state, recorded = None, None
    for path in reversed(folder.checkpoints()):
        try:
            ckpt = folder.load_checkpoint(path)
        except Exception:  # noqa: BLE001 (a damaged checkpoint: try the previous one)
            continue
        if ckpt.get("trainer") is not None and (phase is None or ckpt.get("phase") == phase):
            state, phase = ckpt, ckpt["phase"]
            break
        if recorded is None:
            recorded = ckpt
    if state is None:
        if recorded is None:
            raise UserError(f"{folder.path} has no readable checkpoint to diagnose")
        results = folder.load_results(recorded.get("results", {}))
        learned = [k for k, v in results.items() if isinstance(v, dict) and v.get("metaparams")
                   and (phase is None or k == phase)]
        if not learned:
            raise UserError(f"{folder.path} holds no pre-training phase with meta-parameters"
                            + (f" named {phase!r}" if phase else ""))
        phase = learned[-1]
    from .config import config_changes

    made_with = (state if state is not None else recorded).get("config", "")
    changes = [k for k in config_changes(made_with, folder.config_file.read_text(encoding="utf-8"))
               if not k.startswith("evaluation.")]  # `metapt eval` changes those; pre-training never reads them
    if made_with and changes:
        raise UserError(f"{folder.config_file} was edited since the checkpoint was written ({', '.join(changes[:8])}"
                        f"{' …' if len(changes) > 8 else ''}): the state it holds belongs to the configuration it was "
                        "made with; undo the edit to diagnose it")
    setting, method_name, seed = parse_phase(phase, config.pretrain.seed)
    if method_name not in dom.methods:
        raise UserError(f"phase {phase!r} of {folder.path} is not a method of the {config.job} job")
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    start = time.perf_counter()

    def progress(message: str) -> None:
        console.print(f"[{time.perf_counter() - start:5.1f} s] {message}", highlight=False, markup=False)

    progress(f"loading the data and rebuilding phase {phase!r}")
    data = dom.load(config, setting or dom.settings(config)[0], console)
    method = dom.methods[method_name]
    built = dom.pretraining(config, data, method, seed, torch.device("cpu"))
    meta = config.meta
    trainer = build_trainer(built, config, method, seed)  # as the run built it: its checkpoint's state loads
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        if state.get("problem") is not None and hasattr(built.problem, "load_state_dict"):
            built.problem.load_state_dict(state["problem"])
        source = f"checkpoint of phase {phase!r} at PT step {trainer.step}"
        state_text = f"PT step {trainer.step} of {config.pretrain.steps} of phase {phase!r} (a checkpoint)"
    else:
        value = results[phase]
        with torch.no_grad():
            for k, v in trainer.params.items():
                v.copy_(value["params"][k])
            for k, v in trainer.metaparams.items():
                v.copy_(value["metaparams"][k])
        if value.get("problem") is not None and hasattr(built.problem, "load_state_dict"):
            built.problem.load_state_dict(value["problem"])
        progress(f"{warm_steps} PT steps with φ fixed, re-estimating Adam's moments and the head")
        for _ in range(warm_steps):
            trainer.pretrain_step()
            trainer.warmup_head_step()
        source = f"recorded end of phase {phase!r} + {warm_steps} PT steps re-estimating Adam's moments and the head"
        state_text = (f"the end of phase {phase!r} (θ and φ as recorded after its {config.pretrain.steps} PT steps, "
                      f"then {warm_steps} PT steps with φ fixed to re-estimate Adam's moments and the head; the "
                      f"step counter restarts, so it reads {trainer.step})")
    if options is None:
        options = DiagnoseOptions(horizon=meta.interval)
    estimators = default_estimators(config.pretrain.lr, options.horizon)
    configs = estimator_configs(options.horizon)
    own_estimator = meta.estimator.estimator(config.pretrain.lr)
    own = next((name for name, est in estimators.items() if est == own_estimator), None)
    if own is None and not getattr(own_estimator, "accumulate", 0):  # the accumulated kind has no one-shot estimate
        own = "this run's meta.estimator"
        estimators = {**estimators, own: own_estimator}
        configs[own] = {k: v for k, v in asdict(meta.estimator).items() if v is not None}
    result = diagnose(trainer, estimators, options, progress=progress)
    result.update({"phase": phase, "source": source, "run": str(folder.path), "state": state_text, "own": own,
                   "configs": configs})
    from .schema import jsonable

    write_text_atomic(folder.path / "diagnostics.json", json.dumps(jsonable(result), indent=1) + "\n")
    return result
