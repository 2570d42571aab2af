"""Meta-learned task weights against black-box search (Optuna TPE and random) at equal compute.

Issue 7, "against black-box search at equal compute". Setting: the paper's held-out tasks
(pre-train on 20 ChEMBL targets, fine-tune on the other 10; ``--setting b3db`` pre-trains on all
30 and fine-tunes on B3DB). Every method pre-trains the same GIN (same initialisation, same
batches) for the same PT steps and is scored by the same downstream fine-tuning (full by default,
``--finetune probe`` for a linear probe; one seed, epoch picked on validation):

- meta-learned: metapt's online meta-learning of the task weights (Algorithm 1; paper defaults
  K = 1 head-only unroll, M = 1 Neumann term, a meta-step every 10 PT steps), then fine-tuning.
  Its compute (pre-train + fine-tune) defines W.
- Optuna TPE / Optuna random: each trial pre-trains with fixed task weights w ∈ [0, 2]^T, searched
  directly (uniform prior on each weight, not on the logit), then fine-tunes; the objective is the
  downstream validation AUROC. Each study runs until its compute reaches 5·W; best-so-far is read
  off at 1·W, 2·W, 5·W counting only trials finished by then.
- uniform weights (w = 1, plain multitask pre-training): one trial, as a reference.

Compute is the CPU time of this single-threaded process (time.process_time), because the machine
is shared and wall time moves with other people's load; wall time is recorded alongside. All
methods run in one process, one thread, on the same machine.

    OMP_NUM_THREADS=1 python benchmarks/blackbox_search.py                # the committed run
    OMP_NUM_THREADS=1 python benchmarks/blackbox_search.py --smoke        # seconds, end to end
    python benchmarks/blackbox_search.py --report-only   # redo tables/plot from the JSON (keeps "conclusion")

The held-out setting has 20 pre-training tasks, so 20 weights are searched (30 with ``--setting b3db``).
The committed run took 28 minutes of wall time (about 17 minutes of CPU) on a shared 2-core machine.

Writes benchmarks/results/blackbox_search.{json,md,png} (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metapt.domains.molecules.models import GINEncoder
from metapt.domains.molecules.problem import (
    MoleculesProblem,
    WeightingConfig,
    load_molecule_data,
)
from metapt.evaluation import FinetuneConfig, finetune_and_score, mean_ci95
from metapt.hypergrad import Neumann, sgd
from metapt.metaparams import weights_from_logits
from metapt.trainer import MetaPretrainer, MetaSchedule

RESULTS = Path(__file__).parent / "results"


# ---- one pre-train + fine-tune ------------------------------------------------------------------------

class Clock:
    """CPU seconds (the budget) and wall seconds since construction."""

    def __init__(self):
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def read(self) -> tuple[float, float]:
        return time.process_time() - self.cpu0, time.perf_counter() - self.wall0


def pretrain(data, args, weights: torch.Tensor | None, seed: int):
    """Pre-train; ``weights=None`` meta-learns them (from 1), else they stay fixed. As job.py's _pretrain."""
    torch.manual_seed(seed)
    encoder = GINEncoder(num_layers=args.layers, emb_dim=args.dim, dropout=0.2, norm="layer")
    problem = MoleculesProblem(data, encoder, WeightingConfig(task_weights=True), pt_batch_size=64, seed=seed)
    torch.manual_seed(seed + 1)
    phi = problem.initial_metaparams()
    if weights is not None:
        phi["task_logits"] = torch.logit(weights.float() / 2, eps=1e-6)
    meta = weights is None
    trainer = MetaPretrainer(
        problem, problem.initial_params(), problem.initial_head(), phi,
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=args.meta_lr),
        inner_optimizer=sgd(0.1),
        solver=Neumann(steps=1, alpha=1e-3),
        schedule=MetaSchedule(meta_interval=10 if meta else args.pt_steps + 1, unroll_steps=1,
                              warmup_steps=args.warmup if meta else 0),
    )
    trainer.run(args.pt_steps)
    w = weights_from_logits(trainer.metaparams["task_logits"].detach())
    return problem.encoder_with(trainer.params), w, trainer.skipped


def finetune(data, encoder, args) -> dict:
    """Full fine-tuning or a linear probe (train = FT-train ∪ MetaFT-val, as the molecules job); one seed."""
    if args.finetune == "probe":
        cfg = FinetuneConfig(linear_probe=True, epochs=args.ft_epochs, lr=1e-2, batch_size=64)
    else:
        cfg = FinetuneConfig(epochs=args.ft_epochs, lr=1e-3, batch_size=64)
    return finetune_and_score(encoder, encoder.emb_dim, data.downstream_labels.shape[1], data.iterate_downstream, cfg, seed=0)


def no_pretraining(data, args) -> dict:
    """Fine-tuning the randomly initialised encoder (seed 0, the init every other method starts from)."""
    clock = Clock()
    torch.manual_seed(0)
    score = finetune(data, GINEncoder(num_layers=args.layers, emb_dim=args.dim, dropout=0.2, norm="layer"), args)
    cpu, wall = clock.read()
    return {"valid_auroc": score["valid"], "test_auroc": score["test"], "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}


def trial(data, args, weights: torch.Tensor | None, seed: int = 0) -> dict:
    clock = Clock()
    encoder, w, skipped = pretrain(data, args, weights, seed)
    pt_cpu, _ = clock.read()
    score = finetune(data, encoder, args)
    cpu, wall = clock.read()
    return {"weights": [round(float(v), 4) for v in w], "valid_auroc": score["valid"],
            "test_auroc": score["test"], "best_epoch": score["best_epoch"], "cpu_s": round(cpu, 2),
            "pretrain_cpu_s": round(pt_cpu, 2), "wall_s": round(wall, 2), "seed": seed, "meta_skipped": skipped}


# ---- black-box search ------------------------------------------------------------------------------

def search(data, args, sampler_name: str, budget_cpu: float, log) -> list[dict]:
    try:
        import optuna
    except ImportError:
        raise SystemExit('this benchmark needs Optuna: .venv/bin/pip install -e ".[bench]"') from None

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler_name == "tpe":
        sampler = optuna.samplers.TPESampler(seed=args.search_seed, n_startup_trials=args.tpe_startup, multivariate=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=args.search_seed + 1)  # not TPE's start-up draws
    study = optuna.create_study(direction="maximize", sampler=sampler)
    tasks = len(data.pretrain_task_names)
    trials, spent_cpu, spent_wall = [], 0.0, 0.0
    while spent_cpu < budget_cpu:
        clock = Clock()
        t = study.ask()  # the sampler's own time counts against the budget
        w = torch.tensor([t.suggest_float(f"w{i:02d}", 0.0, 2.0) for i in range(tasks)])
        result = trial(data, args, w)
        study.tell(t, result["valid_auroc"])
        cpu, wall = clock.read()
        spent_cpu, spent_wall = spent_cpu + cpu, spent_wall + wall
        result.update(cpu_s=round(cpu, 2), wall_s=round(wall, 2), cum_cpu_s=round(spent_cpu, 2), cum_wall_s=round(spent_wall, 2))
        trials.append(result)
        log(f"{sampler_name} trial {len(trials)}: valid {result['valid_auroc']:.4f} test {result['test_auroc']:.4f} "
            f"cpu {cpu:.1f}s (total {spent_cpu:.0f}/{budget_cpu:.0f}s)")
    return trials


def best_by(trials: list[dict], cpu_limit: float) -> dict | None:
    """The trial with the best validation AUROC among those finished within ``cpu_limit``."""
    done = [t for t in trials if t["cum_cpu_s"] <= cpu_limit]
    if not done:
        return None
    best = max(done, key=lambda t: t["valid_auroc"])
    return {"valid_auroc": best["valid_auroc"], "test_auroc": best["test_auroc"], "trials": len(done),
            "trial": trials.index(best) + 1}


def resampled_best(trials: list[dict], k: int, draws: int = 20_000, seed: int = 0) -> dict | None:
    """What search with ``k`` trials selects, estimated by drawing k of all trials (both studies pooled,
    treated as exchangeable draws; without replacement) and taking the best-validation one."""
    if k < 1 or k > len(trials):
        return None
    v = np.array([t["valid_auroc"] for t in trials])
    te = np.array([t["test_auroc"] for t in trials])
    rng = np.random.default_rng(seed)
    picks = np.array([(idx := rng.choice(len(trials), size=k, replace=False))[np.argmax(v[idx])] for _ in range(draws)])
    return {"k": k, "valid_mean": float(v[picks].mean()), "valid_p5_p95": [float(x) for x in np.percentile(v[picks], [5, 95])],
            "test_mean": float(te[picks].mean()), "test_p5_p95": [float(x) for x in np.percentile(te[picks], [5, 95])]}


def analyse(res: dict, budget: float) -> None:
    """Best-so-far at 1·W, 2·W, budget·W per study, and the pooled resampling estimate."""
    W = res["W_cpu_s"]
    marks = {f"{k:g}W": k * W for k in (1, 2, budget)}
    res["at_budget"] = {name: {k: best_by(trials, c) for k, c in marks.items()} for name, trials in res["studies"].items()}
    all_trials = [t for ts in res["studies"].values() for t in ts]
    res["trial_cpu_s_mean"] = float(np.mean([t["cpu_s"] for t in all_trials + [res["uniform"]]]))
    res["resampled"] = {k: resampled_best(all_trials, int(c // res["trial_cpu_s_mean"])) for k, c in marks.items()}
    v = np.array([t["valid_auroc"] for t in all_trials])
    te = np.array([t["test_auroc"] for t in all_trials])
    res["trials_summary"] = {"n": len(all_trials), "valid_mean": float(v.mean()), "valid_sd": float(v.std(ddof=1)),
                             "test_mean": float(te.mean()), "test_sd": float(te.std(ddof=1)),
                             "valid_test_corr": float(np.corrcoef(v, te)[0, 1]), "best_test_any_trial": float(te.max())}


# ---- report -----------------------------------------------------------------------------------------

def _fmt(x, ci=None):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4f}" + (f" ± {ci:.4f}" if ci is not None and not math.isnan(ci) else "")


def markdown(res: dict) -> str:
    W = res["W_cpu_s"]
    meta, uni, nopt = res["meta_learned"], res["uniform"], res["no_pretraining"]
    ft = {"probe": "linear probe", "full": "full fine-tuning"}[res["config"]["finetune"]]
    lines = [
        "# Meta-learned task weights vs black-box search (Optuna) at equal compute",
        "",
        (f"Setting `{res['config']['setting']}`: pre-train a {res['config']['layers']}×{res['config']['dim']} GIN on "
        f"{res['pretrain_molecules']} ChEMBL molecules × {res['num_tasks']} tasks for {res['config']['pt_steps']} steps; "
        f"downstream {res['downstream']}, {ft} ({res['config']['ft_epochs']} epochs, one seed, epoch picked on "
        f"validation). W = compute of one meta-learned run (pre-train with meta-steps + fine-tune) = "
        f"**{W:.1f} CPU s** (one thread; wall {res['W_wall_s']:.1f} s). A fixed-weight trial costs "
        f"{res['trial_cpu_s_mean']:.1f} CPU s = {res['trial_cpu_s_mean'] / W:.2f} W."),
        "",
        "| method | compute | trials | valid AUROC (selected on) | test AUROC |",
        "|---|---|---|---|---|",
        f"| no pre-training (random encoder) | {nopt['cpu_s'] / W:.2f} W | – | {_fmt(nopt['valid_auroc'])} | {_fmt(nopt['test_auroc'])} |",
        f"| uniform weights (w = 1) | {uni['cpu_s'] / W:.2f} W | 1 | {_fmt(uni['valid_auroc'])} | {_fmt(uni['test_auroc'])} |",
        f"| meta-learned, seed 0 | 1 W | – | {_fmt(meta['runs'][0]['valid_auroc'])} | {_fmt(meta['runs'][0]['test_auroc'])} |",
        (f"| meta-learned, {len(meta['runs'])} seeds (mean ± 95 % CI) | 1 W each | – | "
         f"{_fmt(meta['valid_mean'], meta['valid_ci95'])} | {_fmt(meta['test_mean'], meta['test_ci95'])} |"),
    ]
    for name in ("tpe", "random"):
        for k, b in res["at_budget"][name].items():
            if b is None:
                lines.append(f"| Optuna {name.upper() if name == 'tpe' else name}, best by {k} | {k} | 0 | – | – |")
            else:
                lines.append(f"| Optuna {name.upper() if name == 'tpe' else name}, best by {k} | {k} | {b['trials']} | "
                             f"{_fmt(b['valid_auroc'])} | {_fmt(b['test_auroc'])} |")
    for k, b in res["resampled"].items():
        if b is not None:
            lines.append(f"| search with {b['k']} trial(s) (≈ {k}), expected, resampled | {k} | {b['k']} | "
                         f"{b['valid_mean']:.4f} [{b['valid_p5_p95'][0]:.4f}, {b['valid_p5_p95'][1]:.4f}] | "
                         f"{b['test_mean']:.4f} [{b['test_p5_p95'][0]:.4f}, {b['test_p5_p95'][1]:.4f}] |")
    ts = res["trials_summary"]
    lines += ["", ("The Optuna rows report the trial with the best validation AUROC among those finished within the "
              "budget (a trial that ends after it does not count), and that same trial's test AUROC. The "
              "\"resampled\" rows estimate what a search with that many trials selects on average, by drawing "
              "that many of all the trials of both studies (pooled; 20,000 draws without replacement) and taking "
              "the best-validation one; brackets are 5th–95th percentiles. "
              f"Over all {ts['n']} searched trials: validation {ts['valid_mean']:.4f} ± {ts['valid_sd']:.4f} (SD), "
              f"test {ts['test_mean']:.4f} ± {ts['test_sd']:.4f}, validation–test correlation "
              f"{ts['valid_test_corr']:.2f}, best test of any trial {ts['best_test_any_trial']:.4f}. "
              "Every trial is in the JSON."), ""]
    lines += ["## Conclusion", "", res.get("conclusion", "(to be written after reading the numbers)"), "",
              f"Command: `{res['command']}` (tables and plot can be redone from the JSON with `--report-only`)", "",
              (f"Total wall time of the run: {res['total_wall_s']:.0f} s; "
               f"machine: {res['machine']['platform']}, torch {res['machine']['torch']}, "
               f"{res['machine']['threads']} thread.")]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    W = res["W_cpu_s"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.0), sharex=True)
    colors = {"tpe": "tab:blue", "random": "tab:orange"}
    for ax, key, title in zip(axes, ("valid_auroc", "test_auroc"), ("validation AUROC (search objective)",
                                                                   "test AUROC of the selected config")):
        for name, trials in res["studies"].items():
            xs, ys, best = [], [], None
            for t in trials:
                if best is None or t["valid_auroc"] > best["valid_auroc"]:
                    best = t
                xs.append(t["cum_cpu_s"] / W)
                ys.append(best[key])
            ax.step(xs, ys, where="post", color=colors[name], lw=2, label=f"Optuna {'TPE' if name == 'tpe' else 'random'} (best so far)")
            ax.scatter([t["cum_cpu_s"] / W for t in trials], [t[key] for t in trials], color=colors[name], s=12, alpha=0.4)
        meta = res["meta_learned"]
        vals = [r[key] for r in meta["runs"]]
        m = float(np.mean(vals))
        ax.axhline(m, color="tab:green", ls="--", lw=1.5, label=f"meta-learned (mean of {len(vals)} seeds)")
        ax.scatter([1.0] * len(vals), vals, color="tab:green", marker="D", s=30, zorder=5)
        pts = [(float(k[:-1]), b) for k, b in res.get("resampled", {}).items() if b is not None]
        if pts:
            stem = "valid" if key == "valid_auroc" else "test"
            ax.errorbar([x + 0.12 for x, _ in pts], [b[f"{stem}_mean"] for _, b in pts],
                        yerr=np.array([[b[f"{stem}_mean"] - b[f"{stem}_p5_p95"][0], b[f"{stem}_p5_p95"][1] - b[f"{stem}_mean"]]
                                       for _, b in pts]).T,
                        fmt="x", color="k", capsize=3, zorder=6, label="search, expected (pooled trials resampled, 5–95 %)")
        uni = res["uniform"]
        ax.axhline(uni[key], color="gray", ls=":", lw=1.5, label="uniform weights")
        ax.scatter([uni["cpu_s"] / W], [uni[key]], color="gray", marker="s", s=30, zorder=5)
        for x in (1, 2, 5):
            ax.axvline(x, color="k", lw=0.5, alpha=0.3)
        ax.set_xlabel("compute (multiples of W = one meta-learned run, CPU s)")
        ax.set_ylabel("AUROC")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{res['config']['setting']}: task weights by meta-learning vs Optuna, W = {W:.0f} CPU s (1 thread); "
                 "dots = single trials")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", default="heldout", choices=("heldout", "b3db"))
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--pt-steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--meta-lr", type=float, default=0.05)
    ap.add_argument("--finetune", default="full", choices=("full", "probe"))
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--max-pretrain", type=int, default=None)
    ap.add_argument("--max-downstream", type=int, default=None)
    ap.add_argument("--meta-seeds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=5.0, help="search budget in multiples of W")
    ap.add_argument("--tpe-startup", type=int, default=4)
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds end to end")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true",
                    help="re-analyse the existing JSON and rewrite JSON, Markdown and PNG; no training")
    args = ap.parse_args()
    if args.smoke:
        args.pt_steps, args.warmup, args.ft_epochs, args.layers, args.dim = 30, 5, 2, 2, 16
        args.max_pretrain, args.max_downstream, args.meta_seeds, args.tag = 400, 300, 2, args.tag or "smoke"
    name = "blackbox_search" + (f"_{args.tag}" if args.tag else "")
    out = args.out
    if args.report_only:
        res = json.loads((out / f"{name}.json").read_text())
        analyse(res, res["config"]["budget"])
        write(res, out, name)
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    data = load_molecule_data(args.setting, seed=0, max_pretrain=args.max_pretrain, max_downstream=args.max_downstream)
    log(f"{args.setting}: {len(data.pretrain_positions)} PT molecules × {len(data.pretrain_task_names)} tasks; "
        + ", ".join(f"{k} {len(v)}" for k, v in data.split.items()))

    runs = []
    for seed in range(args.meta_seeds):
        runs.append(trial(data, args, None, seed=seed))
        log(f"meta seed {seed}: valid {runs[-1]['valid_auroc']:.4f} test {runs[-1]['test_auroc']:.4f} "
            f"cpu {runs[-1]['cpu_s']}s wall {runs[-1]['wall_s']}s")
    W, W_wall = runs[0]["cpu_s"], runs[0]["wall_s"]
    uniform = trial(data, args, torch.ones(len(data.pretrain_task_names)))
    log(f"uniform: valid {uniform['valid_auroc']:.4f} test {uniform['test_auroc']:.4f} cpu {uniform['cpu_s']}s")
    nopt = no_pretraining(data, args)
    log(f"no pre-training: valid {nopt['valid_auroc']:.4f} test {nopt['test_auroc']:.4f} cpu {nopt['cpu_s']}s")

    studies = {name: search(data, args, name, args.budget * W, log) for name in ("tpe", "random")}

    def stat(key):
        return mean_ci95([r[key] for r in runs])

    res = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": {**vars(args), "out": str(out)},
        "search_space": "each task weight w_i ~ uniform[0, 2], searched directly (PT loss weighted as in metapt)",
        "objective": "downstream validation AUROC after fine-tuning (best epoch)",
        "budget_unit": "CPU seconds of this single-threaded process (time.process_time)",
        "pretrain_molecules": len(data.pretrain_positions),
        "num_tasks": len(data.pretrain_task_names),
        "task_names": data.pretrain_task_names,
        "downstream": ", ".join(f"{k} {len(v)}" for k, v in data.split.items()) + f" ({len(data.downstream_task_names)} tasks)",
        "W_cpu_s": W, "W_wall_s": W_wall,
        "meta_learned": {"runs": runs, **dict(zip(("valid_mean", "valid_ci95"), stat("valid_auroc"))),
                         **dict(zip(("test_mean", "test_ci95"), stat("test_auroc")))},
        "uniform": uniform,
        "no_pretraining": nopt,
        "studies": studies,
        "total_wall_s": time.perf_counter() - t0,
    }
    analyse(res, args.budget)
    write(res, out, name)
    print(json.dumps({"W_cpu_s": W, "meta": res["meta_learned"]["test_mean"], "uniform": uniform["test_auroc"],
                      "at_budget": res["at_budget"]}, indent=2))


def write(res: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(res))
    plot(res, out / f"{name}.png")


if __name__ == "__main__":
    main()
