"""benchmarks/blackbox_search.py (issue 24): the black-box baselines are what they say. TPE models
after its few start-up trials, random search is its own row, pruned searches stop trials at the
rungs and pay for it in compute, picks are read at equal CPU time and say where they were found.
Trials are a synthetic objective here (milliseconds); one test pre-trains a tiny GIN for real."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (1, 2, 5, 10)


@pytest.fixture(scope="module")
def bb():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports benchmarks/_results.py
    spec = importlib.util.spec_from_file_location("blackbox_search", ROOT / "benchmarks" / "blackbox_search.py")
    module = sys.modules["blackbox_search"] = importlib.util.module_from_spec(spec)  # its dataclass needs the entry
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        sys.modules.pop("blackbox_search", None)


TARGET = [1.5, 0.2, 1.0, 0.7]


def _objective(weights):
    return 1.0 - sum((w - t) ** 2 for w, t in zip(weights, TARGET)) / len(TARGET)


def _trial_fn(steps=100, fail_every=0):
    """A trial of 1 CPU second for the full steps (a fine-tuning 0.1 s of it); a rung costs its share."""
    calls = {"n": 0, "reported": []}

    def run(weights, report):
        calls["n"] += 1
        value = _objective(weights)
        for i, step in enumerate((25, 50) if report is not None else ()):
            spent = 0.9 * step / steps + 0.1 * (i + 1)
            calls["reported"].append(step)
            if report(step, value - 0.1 * (1 - step / steps)):
                return {"valid": None, "test": None, "best_epoch": None, "pruned": True, "steps": step,
                        "intermediate": [], "cpu_seconds": spent, "weights": weights}
        valid = None if fail_every and calls["n"] % fail_every == 0 else value
        return {"valid": valid, "test": None if valid is None else value - 0.05, "best_epoch": 1, "pruned": False,
                "steps": steps, "intermediate": [], "cpu_seconds": 1.0 + (0.2 if report is not None else 0.0),
                "weights": weights}

    return run, calls


def _check_picks(result, budgets=BUDGETS):
    trials = result["trials"]
    assert [t["number"] for t in trials] == list(range(len(trials)))
    ends = [t["finished_at_w"] for t in trials]
    assert ends == sorted(ends) and ends[-1] >= max(budgets) and (len(ends) < 2 or ends[-2] < max(budgets))
    for b in budgets:
        pick = result["picks"][f"{b:g}"]
        done = [t for t in trials if t["finished_at_w"] <= b and t["state"] == "complete"]
        if not done:
            assert pick is None
            continue
        best = max(done, key=lambda t: t["valid"])
        assert pick["trial"] == best["number"] and pick["valid"] == best["valid"] and pick["test"] == best["test"]
        assert pick["found_at_w"] == best["finished_at_w"] <= b
        assert pick["trials_done"] == sum(t["finished_at_w"] <= b for t in trials)
        assert pick["model_based"] == best["model_based"]


def test_tpe_models_after_its_start_up_trials_and_random_search_never(bb):
    assert bb.N_STARTUP <= 4 and bb.DEFAULT_SEARCHES == ("random", "tpe", "tpe_sha")
    study = bb.make_study(bb.SEARCHES["tpe"], seed=3, steps=100)
    assert type(study.sampler).__name__ == "TPESampler" and study.sampler._n_startup_trials == bb.N_STARTUP
    assert type(bb.make_study(bb.SEARCHES["random"], seed=3, steps=100).sampler).__name__ == "RandomSampler"
    results = {}
    for name in ("random", "tpe"):
        run, calls = _trial_fn()
        results[name] = r = bb.run_search(bb.SEARCHES[name], run, tasks=4, seed=3, steps=100, w_seconds=1.0,
                                          budgets=BUDGETS, log=lambda _: None)
        assert calls["n"] == len(r["trials"]) == 10 and not calls["reported"]  # no pruner: no intermediate reports
        assert all(t["state"] == "complete" for t in r["trials"])
        _check_picks(r)
    assert [t["model_based"] for t in results["random"]["trials"]] == [False] * 10
    assert [t["model_based"] for t in results["tpe"]["trials"]] == [False] * bb.N_STARTUP + [True] * (10 - bb.N_STARTUP)
    # after its start-up, TPE proposes other weights than the random search of the same seed
    modelled = [t["weights"] for t in results["tpe"]["trials"][bb.N_STARTUP:]]
    assert modelled != [t["weights"] for t in results["random"]["trials"][bb.N_STARTUP:]]


def test_successive_halving_prunes_at_the_rungs_and_counts_their_cost(bb):
    assert bb.rung_steps(1000) == [250, 500] and bb.rung_steps(30) == [8, 15]
    run, calls = _trial_fn()
    r = bb.run_search(bb.SEARCHES["tpe_sha"], run, tasks=4, seed=0, steps=100, w_seconds=1.0, budgets=BUDGETS,
                      log=lambda _: None)
    states = [t["state"] for t in r["trials"]]
    assert "pruned" in states and "complete" in states and len(r["trials"]) > 10  # cheaper trials: more of them
    assert all(t["steps"] in (25, 50) and t["cpu_seconds"] < 1.0 for t in r["trials"] if t["state"] == "pruned")
    spent = 0.0
    for t in r["trials"]:
        spent += t["cpu_seconds"]
        assert t["finished_at_w"] == pytest.approx(spent)  # every trial's compute counts, pruned ones too
    # TPE counts pruned trials towards its start-up
    told = 0
    for t in r["trials"]:
        assert t["model_based"] == (told >= bb.N_STARTUP)
        told += 1
    _check_picks(r)


def test_failed_trials_are_never_picked_and_the_table_is_written(bb):
    run, _ = _trial_fn(fail_every=2)
    searches = {name: bb.run_search(bb.SEARCHES[name], run, tasks=4, seed=1, steps=100, w_seconds=1.0,
                                    budgets=BUDGETS, log=lambda _: None) for name in bb.DEFAULT_SEARCHES}
    for r in searches.values():
        assert "fail" in {t["state"] for t in r["trials"]}
        _check_picks(r)
    one = {"valid": 0.7, "test": 0.65, "cpu_seconds": 1.0}
    records = [{"seed": s, "commit": "c" * 40, "meta": one, "uniform": {**one, "cpu_seconds": 0.8}, "searches": searches}
               for s in (0, 1)]
    summary = bb.summarise(records, bb.DEFAULT_SEARCHES, BUDGETS)
    for name in bb.DEFAULT_SEARCHES:
        top = summary["searches"][name]["10"]
        assert top["best_trial"] == [searches[name]["picks"]["10"]["trial"]] * 2
        assert math.isfinite(top["test"]["mean"])
    result = {"command": "x", "commit": "c" * 40, "seed_commits": ["c" * 40], "setting": "heldout", "overrides": [],
              "budgets": list(BUDGETS), "searches": list(bb.DEFAULT_SEARCHES), "n_startup_trials": bb.N_STARTUP,
              "rung_steps": [250, 500], "summary": summary, "seeds": records}
    text = bb.markdown(result)
    assert "| random search, pick at 10 W (2/2 seeds) |" in text
    assert f"| Optuna TPE ({bb.N_STARTUP} start-up trials), pick at 1 W" in text
    assert "successive halving, pick at 5 W" in text and "best trial" in text


def test_a_trial_pretrains_the_same_with_or_without_its_rungs(bb):
    """The intermediate fine-tunings leave the random state alone: a trial that is not pruned ends exactly as
    one without rungs; a pruned trial stops at its rung, cheaper."""
    from metapt.config import load_config
    from metapt.domains.molecules.job import DOMAIN
    from rich.console import Console

    config = load_config("molecules-test", ["data.max_pretrain=60", "data.max_downstream=60", "pretrain.steps=8",
                                            "evaluation.full_finetune.epochs=1", "model.dropout=0.2"])
    data = DOMAIN.load(config, "b3db", Console(quiet=True))
    downstream = DOMAIN.downstream(config, data)
    weights = [0.5 + 0.04 * j for j in range(len(data.pretrain_task_names))]
    plain = bb.run_once(config, data, downstream, "uniform", 0, weights)
    seen = []
    kept = bb.run_once(config, data, downstream, "uniform", 0, weights, lambda step, v: seen.append(step) or False)
    assert seen == bb.rung_steps(8) == [2, 4] and not kept["pruned"] and [s for s, _ in kept["intermediate"]] == seen
    assert (kept["valid"], kept["test"], kept["best_epoch"]) == (plain["valid"], plain["test"], plain["best_epoch"])
    pruned = bb.run_once(config, data, downstream, "uniform", 0, weights, lambda step, v: True)
    assert pruned["pruned"] and pruned["steps"] == 2 and pruned["valid"] is None
