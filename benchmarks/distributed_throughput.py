"""Throughput of data-parallel pre-training and meta-steps: 1 process vs 2 (torchrun, gloo, CPU).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed_throughput.py

Multitask GIN pre-training on a ChEMBL subset (the molecules job's CPU encoder:
3 layers, 64 dims, layer norm; meta-learned task weights, K = 1, Neumann M = 1).
Every configuration runs in fresh processes of one thread each, in the same script
run, in interleaved order, ``--repeats`` times (the best repeat is kept):

* ``1proc_b{2B}``: one plain process (no torch.distributed), batch 2B;
* ``1proc_b{B}``:  one plain process, batch B;
* ``2proc_b{B}``:  ``torchrun --standalone --nproc_per_node 2``, batch B per process
  (global batch 2B), DistributedDataParallel PT steps, all-reduced hypergradients.

"Batch" is the PT and the FT-train/MetaFT-validation batch size alike, so the
2-process meta-step does the same total work as the one-process meta-step at 2B
(two per-shard samples of B); a one-process meta-step, unlike a data-parallel one,
reuses the graph of the PT step just taken (one PT forward/backward fewer).

Measured in each: PT steps/s (a run without meta-steps) and cycles/s with a
meta-step after every PT step; a meta-step's time is a cycle's minus a PT step's.
Ratios: ``speedup_same_global_batch`` = 2proc_b{B} / 1proc_b{2B} (same work per
step: the data-parallel speed-up) and ``weak_scaling`` = 2proc_b{B} / 1proc_b{B}
(per-process work fixed; 1.0 is perfect). Writes
``benchmarks/results/distributed_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "distributed_throughput.json"


def worker(args) -> None:
    """One configuration, in this process (and its torchrun siblings); rank 0 writes ``args.out``."""
    import torch

    from metapt.distributed import init_distributed
    from metapt.domains.molecules.models import GINEncoder
    from metapt.domains.molecules.problem import (
        MoleculesProblem,
        WeightingConfig,
        load_molecule_data,
    )
    from metapt.hypergrad import Neumann, sgd
    from metapt.trainer import MetaPretrainer, MetaSchedule

    torch.set_num_threads(1)
    ctx = init_distributed()
    data = None
    if ctx.is_main:  # featurise (or read the cache) first, so no two processes write the same cache file
        data = load_molecule_data("b3db", max_pretrain=args.molecules, max_downstream=1000)
    ctx.barrier()
    if data is None:
        data = load_molecule_data("b3db", max_pretrain=args.molecules, max_downstream=1000)

    def trainer(meta_interval: int) -> MetaPretrainer:
        torch.manual_seed(0)
        problem = MoleculesProblem(data, GINEncoder(num_layers=3, emb_dim=64, dropout=0.2, norm="layer"),
                                   WeightingConfig(task_weights=True), pt_batch_size=args.batch, ft_batch_size=args.batch)
        return MetaPretrainer(
            ctx.shard(problem), problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
            pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
            meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
            inner_optimizer=sgd(0.1), solver=Neumann(steps=1, alpha=1e-3),
            schedule=MetaSchedule(interval=meta_interval), strategy=ctx.strategy(),
        )

    def rate(t: MetaPretrainer, steps: int) -> float:
        t.run_until(args.warmup)  # first steps: allocations, DDP bucket rebuild
        ctx.barrier()
        start = time.perf_counter()
        t.run_until(args.warmup + steps)
        ctx.barrier()
        return steps / (time.perf_counter() - start)

    pt = rate(trainer(meta_interval=10**9), args.pt_steps)
    cycle = rate(trainer(meta_interval=1), args.meta_steps)
    if ctx.is_main:
        Path(args.out).write_text(json.dumps({
            "processes": ctx.world_size, "batch_per_process": args.batch, "global_batch": args.batch * ctx.world_size,
            "backend": ctx.backend, "pt_steps_per_s": pt, "cycles_per_s": cycle,
            "meta_steps_per_s": 1.0 / (1.0 / cycle - 1.0 / pt),
        }))
    ctx.close()


def launch(processes: int, batch: int, args, out: Path) -> dict:
    common = ["--worker", "--batch", str(batch), "--out", str(out), "--molecules", str(args.molecules),
              "--pt-steps", str(args.pt_steps), "--meta-steps", str(args.meta_steps), "--warmup", str(args.warmup)]
    if processes == 1:
        cmd = [sys.executable, __file__, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               __file__, *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    subprocess.run(cmd, check=True, env=env, timeout=900)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=64, help="PT batch per process in the 2-process run")
    p.add_argument("--molecules", type=int, default=3000, help="ChEMBL molecules pre-trained on")
    p.add_argument("--pt-steps", type=int, default=40)
    p.add_argument("--meta-steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    b = args.batch
    configs = {f"1proc_b{2 * b}": (1, 2 * b), f"1proc_b{b}": (1, b), f"2proc_b{b}": (2, b)}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))  # interleaved against drifting load
            for name in order:
                runs[name].append(launch(*configs[name], args, Path(tmp) / f"{name}-{r}.json"))
                load.append(os.getloadavg()[0])
                print(name, json.dumps(runs[name][-1]), file=sys.stderr)
    best = {name: {k: max(x[k] for x in rs) if k.endswith("_per_s") else rs[0][k] for k in rs[0]}
            for name, rs in runs.items()}
    two, one_same, one_per = best[f"2proc_b{b}"], best[f"1proc_b{2 * b}"], best[f"1proc_b{b}"]
    ratios = {
        kind: {k: two[k] / ref[k] for k in ("pt_steps_per_s", "meta_steps_per_s", "cycles_per_s")}
        for kind, ref in (("speedup_same_global_batch", one_same), ("weak_scaling", one_per))
    }
    from _results import source_commit  # HEAD; refused if metapt comes from another tree
    result = {
        "command": " ".join(["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed_throughput.py", *sys.argv[1:]]),
        "commit": source_commit(),
        "workload": f"molecules GIN (3 layers, 64 dims, layer norm), {args.molecules} ChEMBL molecules, task weights, "
                    "K=1, Neumann M=1; gloo on CPU, 1 thread per process",
        "ratios": ratios,
        "best_of_repeats": best,
        "all_repeats": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "load_average_1min_during": load},
        "note": "load_average_1min_during above the process count means other jobs competed for the cores, "
                "and the 2-process ratios are then lower bounds",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
