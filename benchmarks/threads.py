"""How many torch threads should `metapt run` use? Idle, and with one competing CPU-bound process.

    OMP_NUM_THREADS= .venv/bin/python benchmarks/threads.py [--steps 60] [--allow-dirty]

Times the molecules main job's pre-training (GIN 3×64, batch 64, a meta-step every 10 PT
steps) for ``--steps`` steps in a fresh process per configuration, with 1 and with 2 torch
threads, on an idle machine and next to one competing process that spins on one core (a
stand-in for any other CPU-bound job). Writes benchmarks/results/threads.json and .md:
seconds per configuration and the ratio to the same thread count idle. Run it on an otherwise
idle machine: everything else that runs counts as competition.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys

from _results import provenance, write

WORKLOAD = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from metapt.config import load_config
from metapt.domains import domain
from metapt.trainer import MetaPretrainer
from metapt.hypergrad import sgd
from rich.console import Console
config = load_config("molecules", ["data.max_pretrain=4000", "data.max_downstream=500"])
d = domain("molecules")
data = d.load(config, "b3db", Console(quiet=True))
built = d.pretraining(config, data, d.methods["meta_task_weights"], 0, torch.device("cpu"))
meta = config.meta
t = MetaPretrainer(built.problem, built.params, built.head, built.metaparams,
                   pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=config.pretrain.lr),
                   meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=meta.lr), inner_optimizer=sgd(meta.inner_lr),
                   estimator=meta.estimator.estimator(config.pretrain.lr), schedule=meta.schedule(warmup_steps=0))
t.run_until(10)
start = time.perf_counter()
t.run_until(10 + int(sys.argv[2]))
print(time.perf_counter() - start)
"""


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def timed(threads: int, steps: int, competitor: bool) -> float:
    stop = mp.Event()
    spinner = mp.Process(target=_spin, args=(stop,)) if competitor else None
    if spinner is not None:
        spinner.start()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        out = subprocess.run([sys.executable, "-c", WORKLOAD, str(threads), str(steps)], env=env,
                             capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    finally:
        if spinner is not None:
            stop.set()
            spinner.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    source = provenance(args.allow_dirty)
    rows = []
    for competitor in (False, True):
        for threads in (1, 2):
            seconds = timed(threads, args.steps, competitor)
            rows.append({"threads": threads, "competing_process": competitor, "seconds": round(seconds, 2)})
            print(json.dumps(rows[-1]), flush=True)
    idle = {r["threads"]: r["seconds"] for r in rows if not r["competing_process"]}
    for r in rows:
        r["ratio_to_idle_same_threads"] = round(r["seconds"] / idle[r["threads"]], 2)
        r["ratio_to_idle_1_thread"] = round(r["seconds"] / idle[1], 2)
    lines = ["# Torch threads, idle and with one competing process (benchmarks/threads.py)", "",
             f"{args.steps} PT steps of the molecules main job (meta-step every 10) after 10 warm-up steps; "
             f"{os.cpu_count()} CPUs.", "",
             "| threads | competing process | seconds | × idle, same threads | × idle, 1 thread |", "|---|---|---|---|---|"]
    lines += [f"| {r['threads']} | {'yes' if r['competing_process'] else 'no'} | {r['seconds']} | "
              f"{r['ratio_to_idle_same_threads']} | {r['ratio_to_idle_1_thread']} |" for r in rows]
    lines += ["", f"Command: `{source['command']}` at commit {source['commit']}."]
    write("threads", {**source, "steps": args.steps, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
