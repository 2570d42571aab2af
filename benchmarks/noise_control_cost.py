"""Cost of the noise-control options: meta-training time / plain pre-training time, one process.

The molecules job (B3DB setting, 35,633 ChEMBL molecules × 30 tasks, task weights) on the 3 × 64
GIN (the job's default) and Hu et al.'s 5 × 300 GIN. Every trainer is built by the runner
(``runner.build_trainer``) from the job's configuration with the option's overrides; plain
pre-training is the ``uniform`` method (φ frozen). The trainers are advanced in turn, in chunks of
the options' longest ``meta.interval`` (each meta chunk holds one meta-step or more), on the same
batch indices, in a rotating order; a ratio is the median over chunks of (option's chunk time /
plain chunk time).
Timing starts after the warm-up and two meta-steps, so the accumulated estimator is drawing.

    OMP_NUM_THREADS=1 python benchmarks/noise_control_cost.py --out noise_control_cost
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _results import provenance, write
from rich.console import Console

from metapt.config import load_config
from metapt.domains.molecules.job import DOMAIN, METHODS
from metapt.runner import build_trainer

OPTIONS = {
    "default (unrolled, T = 1)": [],
    "default without the inner-rate cap": ["meta.inner_lr_cap=off"],
    "accumulated, every PT step": ["meta.estimator=accumulated"],
    "accumulated, every 2nd PT step": ["meta.estimator=accumulated", "meta.estimator.every=2"],
    "accumulated + polyak + normalized": ["meta.estimator=accumulated", "meta.average=polyak",
                                          "meta.normalize_weights=true"],
    "accumulated every 2nd + polyak + normalized": ["meta.estimator=accumulated", "meta.estimator.every=2",
                                                    "meta.average=polyak", "meta.normalize_weights=true"],
    "accumulated every 2nd + polyak + normalized, interval 20": [
        "meta.estimator=accumulated", "meta.estimator.every=2", "meta.average=polyak", "meta.normalize_weights=true",
        "meta.interval=20"],
}
SIZES = {"3x64": ["model.num_layers=3", "model.emb_dim=64"], "5x300": ["model.num_layers=5", "model.emb_dim=300"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--options", default="", help="';'-separated OPTIONS to time (default: all)")
    ap.add_argument("--max-pretrain", type=int, default=None)
    ap.add_argument("--out")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    prov = provenance(args.allow_dirty) if args.out else None
    chosen = [o.strip() for o in args.options.split(";") if o.strip()] or list(OPTIONS)
    unknown = [o for o in chosen if o not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown options {unknown}; choose from {list(OPTIONS)}")
    options = {o: OPTIONS[o] for o in chosen}
    torch.set_num_threads(1)
    started = time.perf_counter()
    base = ["device=cpu", "meta.warmup_steps=20", "pretrain.steps=100000"]
    if args.max_pretrain:
        base.append(f"data.max_pretrain={args.max_pretrain}")
    data = DOMAIN.load(load_config("molecules", base), "b3db", Console(stderr=True))
    table = {}
    for size in args.sizes.split(","):
        configs = {"plain": (load_config("molecules", base + SIZES[size]), "uniform")}
        configs |= {o: (load_config("molecules", base + SIZES[size] + sets), "meta_task_weights")
                    for o, sets in options.items()}
        interval = max(config.meta.interval for config, _ in configs.values())  # each chunk holds a meta-step
        trainers = {}
        for name, (config, method) in configs.items():
            built = DOMAIN.pretraining(config, data, METHODS[method], 0, torch.device("cpu"))
            trainers[name] = build_trainer(built, config, METHODS[method], 0)
            trainers[name].run_until(20 + 2 * interval)  # warm-up and two meta-steps, untimed
        times: dict[str, list[float]] = {name: [] for name in trainers}
        names = list(trainers)
        for chunk in range(args.chunks):
            order = names[chunk % len(names):] + names[:chunk % len(names)]
            for name in order:
                t = trainers[name]
                start = time.perf_counter()
                t.run_until(t.step + interval)
                times[name].append(time.perf_counter() - start)
        table[size] = {o: statistics.median(a / b for a, b in zip(times[o], times["plain"])) for o in options}
        table[size]["plain seconds per PT step"] = statistics.median(times["plain"]) / interval
        print(size, table[size], flush=True)
    result = {"benchmark": "noise_control_cost", **(prov or {}), "options": options, "sizes": SIZES,
              "chunks": args.chunks, "table": table, "wall_seconds": round(time.perf_counter() - started, 1)}
    lines = ["# Cost of the noise-control options: meta-training / plain pre-training time", "",
             f"`{result.get('command', '')}` (commit {str(result.get('commit', '?'))[:10]}, "
             f"{result['wall_seconds']:.0f} s; one thread; median over {args.chunks} chunks of per-chunk ratios)", "",
             "| option | " + " | ".join(f"{s} GIN" for s in table) + " |", "|---" * (len(table) + 1) + "|"]
    for o in options:
        lines.append(f"| {o} | " + " | ".join(f"{table[s][o]:.2f}×" for s in table) + " |")
    lines.append("| plain PT, seconds per step | " + " | ".join(
        f"{table[s]['plain seconds per PT step']:.3f}" for s in table) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        write(args.out, result, md)


if __name__ == "__main__":
    main()
