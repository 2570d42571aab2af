"""Meta-learned task weights against black-box searches of them (random search, Optuna TPE, TPE with
successive halving) at equal CPU time: 1, 2, 5 and 10 times the meta-learned run's compute, with one
search per pre-training seed and the search's actual pick.

For each pre-training seed s (its own θ₀ and batch order, shared by every run of that seed):

- meta-learned: the runner's ``meta_task_weights`` phase (the default estimator and schedule of
  the ``molecules`` preset), then fine-tuning. Its CPU time, pre-training plus fine-tuning, is W_s.
- uniform: the same pre-training with every weight 1 (φ frozen at φ₀).
- each search (sampler seeded with s): each trial pre-trains with fixed weights w ∈ [0, 2]^T
  (uniform prior on each weight) and fine-tunes; its objective is the downstream *valid* AUROC.
  A search runs until it has spent 10·W_s. At each budget b·W_s its pick is the complete trial with
  the best valid AUROC among those ended by then; the table reports that trial's test AUROC and
  where it was found (trial number, compute spent, whether TPE's model chose it).

The searches (``--searches``; default ``random,tpe,tpe_sha``):

- ``random``: Optuna's RandomSampler, full trials: the baseline any search must beat.
- ``tpe``: TPESampler with 4 random start-up trials (:data:`N_STARTUP`; Optuna's default 10 made
  every trial of the earlier version of this benchmark, 1–7 per seed, a random draw).
- ``tpe_sha``: the same TPE, with cheaper trials: successive halving (Optuna's asynchronous
  SuccessiveHalvingPruner, reduction factor 2) on the valid AUROC of a fine-tuning after 1/4 and 1/2
  of the PT steps (:data:`RUNG_FRACTIONS`); a pruned trial stops there. Those fine-tunings count
  in its compute.
- opt-in: ``random_sha`` (what pruning alone buys) and ``tpe_hyperband`` (Hyperband over the same
  rungs; it splits trials over brackets and TPE samples each bracket from its own, so at these
  budgets it models little).

Every run fine-tunes the same way (one fine-tuning seed; the epoch picked on valid), so test is
read only to fill the table. Compute is CPU time of this process (``time.process_time``, one torch
thread): the machine is shared, and wall time moves with other people's load.

    .venv/bin/python benchmarks/blackbox_search.py                       # 5 seeds, held-out setting
    # two processes share the seeds, then the table from their finished seeds:
    .venv/bin/python benchmarks/blackbox_search.py --only-seeds 0,1,2 & .venv/bin/python benchmarks/blackbox_search.py --only-seeds 3,4; wait
    .venv/bin/python benchmarks/blackbox_search.py
    .venv/bin/python benchmarks/blackbox_search.py --smoke --allow-dirty  # a minute, end to end

Cost: per seed about 2 W for meta and uniform plus 10 W per search (W ≈ 48 CPU s at the default
sizes): about 25 CPU minutes per seed with the three default searches.

Per-seed records go to runs/blackbox_search[_TAG]/seedS.json (reused by a later run with the same
arguments; each keeps the commit it was run at); the table to benchmarks/results/blackbox_search[_TAG].{json,md}.
Needs Optuna: ``pip install -e ".[bench]"`` (also in ``[dev]``: tests/test_blackbox_search.py runs the
search loop).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from _results import ROOT, provenance, write
from rich.console import Console

from metapt.config import load_config
from metapt.domains.molecules.data import target_name
from metapt.domains.molecules.job import DOMAIN
from metapt.evaluation import finetune_and_score, mean_ci95
from metapt.metaparams import weights_from_logits
from metapt.rng import capture_rng, restore_rng
from metapt.runner import build_trainer

#: The search's compute, in multiples of W (the meta-learned run's CPU time); the picks are read at each.
BUDGETS = (1, 2, 5, 10)
#: TPE's random start-up trials: Optuna's default is 10, which at these budgets (about one full trial
#: per W) left every trial a random draw; with 4, TPE models from the 5th finished or pruned trial on.
N_STARTUP = 4
#: Pruned searches fine-tune and report the valid AUROC after these fractions of the pre-training
#: steps: the rungs of successive halving (min resource steps/4, reduction factor 2) and Hyperband.
RUNG_FRACTIONS = (0.25, 0.5)


@dataclass(frozen=True)
class Search:
    """One black-box search over the task weights: Optuna's sampler and pruner."""

    label: str
    sampler: str  # "random" or "tpe"
    pruner: str | None = None  # None, "sha" (successive halving) or "hyperband"


SEARCHES = {
    "random": Search("random search", "random"),
    "tpe": Search(f"Optuna TPE ({N_STARTUP} start-up trials)", "tpe"),
    "tpe_sha": Search(f"TPE ({N_STARTUP} start-up) + successive halving", "tpe", "sha"),
    "random_sha": Search("random search + successive halving", "random", "sha"),
    # Hyperband splits the trials over brackets and TPE samples each bracket from its own trials only,
    # so at these budgets it models little: opt-in
    "tpe_hyperband": Search(f"TPE ({N_STARTUP} start-up) + Hyperband", "tpe", "hyperband"),
}
DEFAULT_SEARCHES = ("random", "tpe", "tpe_sha")


def rung_steps(steps: int) -> list[int]:
    """The PT steps at which a pruned trial reports its intermediate valid AUROC."""
    return sorted({max(1, round(f * steps)) for f in RUNG_FRACTIONS} - {steps})


def run_once(config: Any, data: Any, downstream: Any, method: str, seed: int, weights: list[float] | None = None,
             report: Callable[[int, float], bool] | None = None) -> dict[str, Any]:
    """Pre-train (with ``weights`` frozen, if given) and fine-tune once; scores and CPU seconds.

    With ``report``, fine-tunes also at :func:`rung_steps` and calls ``report(step, valid)``; when it
    answers True the trial stops there (``pruned``). The intermediate fine-tuning leaves the global
    random state as it found it, so a trial that is not pruned pre-trains exactly as without it.
    """
    start = time.process_time()
    m = DOMAIN.methods[method]
    built = DOMAIN.pretraining(config, data, m, seed, torch.device("cpu"))
    if weights is not None:  # w = 2·sigmoid(logit), w in (0, 2)
        w = torch.tensor(weights, dtype=torch.float32).clamp(1e-4, 2 - 1e-4)
        built = replace(built, metaparams={"task_logits": torch.log(w / (2 - w))})
    trainer = build_trainer(built, config, m, seed)
    ev = config.evaluation
    finite = lambda v: v if math.isfinite(v) else None  # noqa: E731  (NaN: a split with one class; counted, not scored)

    def score() -> dict[str, Any]:
        return finetune_and_score(built.encoder(trainer.params), built.emb_dim, downstream.num_tasks,
                                  downstream.iterate(None, ev.min_batches_per_epoch), ev.full_finetune, seed=0,
                                  metric=downstream.metric)

    intermediate = []
    for step in rung_steps(config.pretrain.steps) if report is not None else []:
        trainer.run_until(step)
        rng = capture_rng()
        valid = finite(score()["valid"])
        restore_rng(rng)
        intermediate.append([step, valid])
        if valid is not None and report(step, valid):
            return {"valid": None, "test": None, "best_epoch": None, "pruned": True, "steps": step,
                    "intermediate": intermediate, "cpu_seconds": time.process_time() - start, "weights": weights}
    trainer.run_until(config.pretrain.steps)
    final = score()
    learned = weights_from_logits(trainer.metaparams["task_logits"]).tolist()
    return {"valid": finite(final["valid"]), "test": finite(final["test"]), "best_epoch": final["best_epoch"],
            "pruned": False, "steps": config.pretrain.steps, "intermediate": intermediate,
            "cpu_seconds": time.process_time() - start, "weights": [round(v, 4) for v in learned]}


def make_study(search: Search, seed: int, steps: int):
    """The Optuna study of one search, seeded by the pre-training seed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.RandomSampler(seed=seed) if search.sampler == "random"
               else optuna.samplers.TPESampler(seed=seed, n_startup_trials=N_STARTUP))
    rungs = rung_steps(steps)
    pruner = {None: optuna.pruners.NopPruner(),
              "sha": optuna.pruners.SuccessiveHalvingPruner(min_resource=rungs[0] if rungs else 1, reduction_factor=2),
              "hyperband": optuna.pruners.HyperbandPruner(min_resource=rungs[0] if rungs else 1, max_resource=steps,
                                                           reduction_factor=2)}[search.pruner]
    return optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)


def run_search(search: Search, trial_fn: Callable[..., dict[str, Any]], tasks: int, seed: int, steps: int,
               w_seconds: float, budgets: tuple[float, ...] = BUDGETS, log: Callable[[str], None] = print
               ) -> dict[str, Any]:
    """One search until it has spent ``max(budgets) · w_seconds`` CPU seconds, and its pick at each budget.

    ``trial_fn(weights, report)`` runs one trial (:func:`run_once`'s result; ``report`` is None unless
    the search prunes). Each trial records where it stands: its number, whether the sampler's model
    chose it (TPE after :data:`N_STARTUP` finished or pruned trials; never for random search), its
    state and the compute spent when it ended, in W. The pick at b·W is the best-valid complete trial
    ended within b·W; where it was found (trial number, W) is part of the pick.
    """
    import optuna

    study = make_study(search, seed, steps)
    trials: list[dict[str, Any]] = []
    spent = 0.0
    while spent < max(budgets) * w_seconds:
        told = sum(t["state"] in ("complete", "pruned") for t in trials)  # what TPE counts towards its start-up
        trial = study.ask()
        weights = [trial.suggest_float(f"w{j}", 0.0, 2.0) for j in range(tasks)]

        def report(step: int, value: float, trial=trial) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        r = trial_fn(weights, report if search.pruner else None)
        state = "pruned" if r["pruned"] else ("fail" if r["valid"] is None else "complete")
        if state == "complete":
            study.tell(trial, r["valid"])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED if state == "pruned" else optuna.trial.TrialState.FAIL)
        spent += r["cpu_seconds"]
        trials.append({**r, "number": trial.number, "state": state, "weights": [round(w, 4) for w in weights],
                       "model_based": search.sampler == "tpe" and told >= N_STARTUP,
                       "finished_at_w": spent / w_seconds})
        log(f"seed {seed} {search.label}: trial {len(trials)} {state} after {r['steps']} steps, valid {r['valid']} "
            f"test {r['test']} at {spent / w_seconds:.2f} W")
    picks: dict[str, Any] = {}
    for b in budgets:
        ended = [t for t in trials if t["finished_at_w"] <= b]
        done = [t for t in ended if t["state"] == "complete"]
        best = max(done, key=lambda t: t["valid"]) if done else None
        picks[f"{b:g}"] = None if best is None else {
            "trial": best["number"], "trials_done": len(ended), "complete": len(done),
            "pruned": sum(t["state"] == "pruned" for t in ended), "found_at_w": best["finished_at_w"],
            "model_based": best["model_based"], "valid": best["valid"], "test": best["test"]}
    return {"search": search.label, "sampler": search.sampler, "pruner": search.pruner, "trials": trials,
            "picks": picks}


def search_seed(config: Any, data: Any, downstream: Any, seed: int, searches: tuple[str, ...],
                budgets: tuple[float, ...] = BUDGETS) -> dict[str, Any]:
    """Meta-learned and uniform weights, then every search, at equal CPU time for pre-training seed ``seed``."""
    meta = run_once(config, data, downstream, "meta_task_weights", seed)
    uniform = run_once(config, data, downstream, "uniform", seed)
    tasks = len(data.pretrain_task_names)

    def trial_fn(weights, report):
        return run_once(config, data, downstream, "uniform", seed, weights, report)

    out = {name: run_search(SEARCHES[name], trial_fn, tasks, seed, config.pretrain.steps, meta["cpu_seconds"], budgets)
           for name in searches}
    return {"seed": seed, "meta": meta, "uniform": uniform, "searches": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", default="heldout", choices=("heldout", "b3db"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="pre-training seeds first-seed .. first-seed+seeds-1")
    ap.add_argument("--only-seeds", default="", help="run just these seeds and write no table (see above)")
    ap.add_argument("--searches", default=",".join(DEFAULT_SEARCHES),
                    help=f"comma-separated, of {', '.join(SEARCHES)} (default: %(default)s)")
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS),
                    help="multiples of W at which the picks are read; each search runs to the largest")
    ap.add_argument("--set", action="append", default=[], help="override a key of the molecules preset")
    ap.add_argument("--smoke", action="store_true", help="a tiny configuration, seconds end to end")
    ap.add_argument("--tag", default="")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    searches = tuple(s for s in args.searches.split(",") if s)
    unknown = [s for s in searches if s not in SEARCHES]
    if unknown or not searches:
        ap.error(f"--searches: unknown {unknown}; choose from {list(SEARCHES)}")
    budgets = tuple(sorted(float(b) for b in args.budgets.split(",") if b))
    if not budgets or budgets[0] <= 0:
        ap.error("--budgets: positive multiples of W, e.g. 1,2,5,10")
    torch.set_num_threads(1)
    source = provenance(args.allow_dirty)
    overrides = [f"data.settings=[{args.setting}]", "pretrain.steps=1000", "evaluation.full_finetune.epochs=3"]
    if args.smoke:
        overrides += ["data.max_pretrain=300", "data.max_downstream=600", "pretrain.steps=30", "meta.warmup_steps=5",
                      "model.emb_dim=16", "evaluation.full_finetune.epochs=1"]
    config = load_config("molecules", [*overrides, *args.set])
    name = "blackbox_search" + (f"_{args.tag}" if args.tag else "") + ("_smoke" if args.smoke else "")
    folder = ROOT / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    # a seed's record is reused by a later run with the same arguments; it keeps its own commit
    key = {"dirty": source["dirty"], "setting": args.setting, "overrides": overrides + args.set,
           "searches": list(searches), "budgets": list(budgets), "n_startup_trials": N_STARTUP,
           "rung_fractions": list(RUNG_FRACTIONS)}
    data = DOMAIN.load(config, args.setting, Console(stderr=True))
    downstream = DOMAIN.downstream(config, data)

    only = [int(s) for s in args.only_seeds.split(",") if s]
    records = []
    for seed in only or range(args.first_seed, args.first_seed + args.seeds):
        path = folder / f"seed{seed}.json"
        if path.is_file() and json.loads(path.read_text()).get("key") == key:
            records.append(json.loads(path.read_text()))
            continue
        record = {"key": key, "commit": source["commit"], **search_seed(config, data, downstream, seed, searches, budgets)}
        path.write_text(json.dumps(record, indent=1, allow_nan=False))
        records.append(record)
    if only:
        print(f"seeds {only} done in {folder}; run again without --only-seeds for the table")
        return
    result = {**source, "seed_commits": sorted({r["commit"] for r in records}), "setting": args.setting,
              "overrides": key["overrides"], "budgets": list(budgets), "searches": list(searches),
              "n_startup_trials": N_STARTUP, "rung_steps": rung_steps(config.pretrain.steps),
              "pretrain_tasks": {t: target_name(t) for t in data.pretrain_task_names},
              "summary": summarise(records, searches, budgets), "seeds": records}
    write(name, result, markdown(result))


def _stat(values: list[float | None]) -> dict[str, Any]:
    mean, ci = mean_ci95(values)
    return {"mean": mean, "ci95": ci, "values": values, "unscored": sum(v is None for v in values)}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def summarise(records: list[dict[str, Any]], searches: tuple[str, ...], budgets: tuple[float, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"meta": {s: _stat([r["meta"][s] for r in records]) for s in ("valid", "test")},
                           "uniform": {s: _stat([r["uniform"][s] for r in records]) for s in ("valid", "test")},
                           "meta_minus_uniform_test": _stat([_diff(r["meta"]["test"], r["uniform"]["test"]) for r in records]),
                           "W_cpu_seconds": _stat([r["meta"]["cpu_seconds"] for r in records]), "searches": {}}
    for name in searches:
        by_budget = {}
        for b in budgets:
            picks = [r["searches"][name]["picks"][f"{b:g}"] for r in records]
            usable = [(r, p) for r, p in zip(records, picks) if p is not None]
            by_budget[f"{b:g}"] = {
                "seeds_with_a_complete_trial": len(usable),
                "trials_done": [p["trials_done"] for _, p in usable],
                "pruned": [p["pruned"] for _, p in usable],
                # where the pick was found: its trial number (from 0), the compute spent when it ended, and
                # whether the sampler's model chose it (TPE after its start-up trials)
                "best_trial": [p["trial"] for _, p in usable],
                "best_found_at_w": [round(p["found_at_w"], 3) for _, p in usable],
                "best_model_based": sum(p["model_based"] for _, p in usable),
                **{s: _stat([p[s] for _, p in usable]) for s in ("valid", "test")},
                "meta_minus_this_test": _stat([_diff(r["meta"]["test"], p["test"]) for r, p in usable]),
            }
        out["searches"][name] = by_budget
    return out


def markdown(r: dict[str, Any]) -> str:
    s = r["summary"]

    def f(c: dict[str, Any], scale: float = 1, fmt: str = ".4f") -> str:
        if not math.isfinite(c["mean"]):
            return "n/a"
        text = f"{scale * c['mean']:{fmt}}" + (f" ± {scale * c['ci95']:{fmt.lstrip('+')}}" if math.isfinite(c["ci95"]) else "")
        return text + (f" ({c['unscored']} unscored)" if c["unscored"] else "")

    pts = lambda c: f(c, 100, "+.1f")  # noqa: E731
    span = lambda v: f"{min(v)}–{max(v)}" if v and min(v) != max(v) else (f"{v[0]}" if v else "–")  # noqa: E731
    n = len(r["seeds"])
    rungs = r.get("rung_steps", [])
    lines = [f"# Meta-learned task weights vs black-box search, {n} pre-training seeds ({r['setting']})", "",
             f"Per seed, W = CPU seconds of the meta-learned run (pre-training + fine-tuning); mean W "
             f"{s['W_cpu_seconds']['mean']:.1f} s. Every search runs, with the seed's θ₀ and batch order, until it "
             f"has spent {max(r['budgets']):g} W; its pick at b·W is its best-valid complete trial ended within "
             "b·W, and the table gives that trial's test AUROC. Each trial pre-trains with fixed weights "
             "w ∈ [0, 2]^T (uniform prior on each) and fine-tunes; its objective is the valid AUROC. "
             f"TPE: Optuna's TPESampler with {r['n_startup_trials']} random start-up trials (finished or pruned). "
             f"Successive halving / Hyperband: the trial also fine-tunes after {', '.join(map(str, rungs))} PT steps "
             "and reports that valid AUROC (reduction factor 2); the extra fine-tuning counts in its compute. "
             "Mean ± 95 % CI over pre-training seeds; paired differences per seed, in AUROC points. "
             "'best trial': the pick's trial number (from 1) and the compute spent when it ended, per seed; "
             "'modelled': how many seeds' picks TPE's model chose (not a start-up draw).", "",
             "| method | compute | trials (pruned) | valid AUROC | test AUROC | meta − this, test (points) | best trial: # at W, per seed | modelled |",
             "|---|---|---|---|---|---|---|---|",
             f"| meta-learned task weights | 1 W | | {f(s['meta']['valid'])} | {f(s['meta']['test'])} | | | |",
             f"| uniform weights | ≈ {sum(x['uniform']['cpu_seconds'] for x in r['seeds']) / sum(x['meta']['cpu_seconds'] for x in r['seeds']):.2f} W "
             f"| | {f(s['uniform']['valid'])} | {f(s['uniform']['test'])} | {pts(s['meta_minus_uniform_test'])} | | |"]
    for name in r["searches"]:
        label = r["seeds"][0]["searches"][name]["search"]
        for b in r["budgets"]:
            t = s["searches"][name][f"{b:g}"]
            if not t["seeds_with_a_complete_trial"]:
                lines.append(f"| {label}, pick at {b:g} W | {b:g} W | no trial complete | | | | | |")
                continue
            found = ", ".join(f"#{i + 1} at {w:.1f}" for i, w in zip(t["best_trial"], t["best_found_at_w"]))
            lines.append(f"| {label}, pick at {b:g} W ({t['seeds_with_a_complete_trial']}/{n} seeds) | {b:g} W "
                         f"| {span(t['trials_done'])} ({span(t['pruned'])}) | {f(t['valid'])} | {f(t['test'])} "
                         f"| {pts(t['meta_minus_this_test'])} | {found} | "
                         + (f"{t['best_model_based']}/{t['seeds_with_a_complete_trial']}" if "tpe" in name else "–") + " |")
    top = f"{max(r['budgets']):g}"
    lines += ["", f"## Per seed (test AUROC; searches at {top} W)", "", "| seed | W (CPU s) | meta | uniform | " +
              " | ".join(r["seeds"][0]["searches"][nm]["search"] for nm in r["searches"]) + " |",
              "|---|---|---|---|" + "---|" * len(r["searches"])]
    g = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for x in r["seeds"]:
        cells = []
        for nm in r["searches"]:
            p, trials = x["searches"][nm]["picks"][top], x["searches"][nm]["trials"]
            cells.append("–" if p is None else f"{g(p['test'])} (#{p['trial'] + 1} of {len(trials)})")
        lines.append(f"| {x['seed']} | {x['meta']['cpu_seconds']:.1f} | {g(x['meta']['test'])} | {g(x['uniform']['test'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Configuration: preset molecules with {', '.join(f'`{o}`' for o in r['overrides'])}. Every trial is in "
              "the JSON.", "", f"Command: `{r['command']}` at commit {r['commit']}; the seeds were run at commit(s) "
              f"{', '.join(r['seed_commits'])}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
