"""Cost of one meta-step as a ratio to one plain pre-training step, in the same process.

For an MLP and a 5-layer, 300-dim GIN (Hu et al. sizes), the meta-step of
MetaPretrainer (K unrolled head steps, M Neumann HVPs, one mixed product) is timed
against a plain PT step of the same model and batch, across M ∈ {0,1,5,20},
K ∈ {1,5} and 10 … 1e6 meta-parameters (per-example weights over a pool of that
size). Peak memory is the extra resident memory of a fresh subprocess running one
step, meta over PT. Prints JSON; `--out` also writes it.

Example weights are read as the library reads them (``metapt.metaparams.ExampleWeights``:
a row-sparse hypergradient) and updated by ``metapt.optim.LazyAdam`` (only the touched
rows); ``--variants lazy,dense`` also runs the dense path (``logits[ids]``, a dense [N]
hypergradient, ``torch.optim.Adam``) in the same process for comparison. ``--flatness-only``
runs just the 10 … 1e6 sweep at M = K = 1.

    python benchmarks/hypergrad_cost.py --out benchmarks/results/hypergrad_cost.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metapt import MetaPretrainer, MetaSchedule
from metapt.hypergrad import Neumann, sgd
from metapt.metaparams import ExampleWeights
from metapt.optim import LazyAdam
from _results import source_commit  # noqa: E402  (HEAD; refused if metapt comes from another tree)

BATCH = 64
TASKS = 32


class Problem:
    """Per-example-weighted multitask BCE on a fixed synthetic batch."""

    def __init__(self, kind: str, num_meta: int, seed: int = 0, variant: str = "lazy"):
        g = torch.Generator().manual_seed(seed)
        self.kind, self.num_meta, self.variant = kind, num_meta, variant
        self.weights = ExampleWeights(num_meta)
        if kind == "mlp":
            self.encoder = torch.nn.Sequential(
                torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU()
            )
            self.dim = 512
            self.inputs = [torch.randn(BATCH, 256, generator=g) for _ in range(3)]
        else:
            from metapt.domains.molecules.models import GINEncoder

            self.encoder = GINEncoder.hu2020()
            self.dim = self.encoder.emb_dim
            self.inputs = [_random_molecules(BATCH, g) for _ in range(3)]
        self.encoder.train()
        self.pt_head = torch.nn.Linear(self.dim, TASKS)
        self.labels = (torch.rand(BATCH, TASKS, generator=g) < 0.5).float()
        self.ft_labels = (torch.rand(BATCH, generator=g) < 0.5).float()
        self.example_ids = torch.randint(0, num_meta, (BATCH,), generator=g)

    def initial(self):
        params = {f"enc.{k}": v.detach().clone() for k, v in self.encoder.named_parameters()}
        params.update({f"pt.{k}": v.detach().clone() for k, v in self.pt_head.named_parameters()})
        head = {"weight": torch.zeros(self.dim), "bias": torch.zeros(())}
        return params, head, {"example_logits": torch.zeros(self.num_meta)}

    def _embed(self, params, x):
        enc = {k[4:]: v for k, v in params.items() if k.startswith("enc.")}
        return functional_call(self.encoder, enc, (x,))

    def pretrain_loss(self, params, metaparams, batch):
        z = self._embed(params, self.inputs[0])
        logits = z @ params["pt.weight"].T + params["pt.bias"]
        per_example = F.binary_cross_entropy_with_logits(logits, self.labels, reduction="none").mean(1)
        if self.variant == "lazy":  # row-sparse hypergradient
            w = self.weights.weights(metaparams, self.example_ids)
        else:  # dense [N] hypergradient
            w = 2 * torch.sigmoid(metaparams["example_logits"][self.example_ids])
        return (w * per_example).mean()

    def finetune_loss(self, params, head, batch):
        z = self._embed(params, self.inputs[batch])
        return F.binary_cross_entropy_with_logits(z @ head["weight"] + head["bias"], self.ft_labels)

    def pretrain_batch(self, i):
        return 0

    def finetune_batch(self, i):
        return 1

    def metaval_batch(self, i):
        return 2

    def describe_metaparams(self, metaparams):
        return {}


def _random_molecules(n, g):
    from torch_geometric.data import Batch, Data

    graphs = []
    for _ in range(n):
        atoms = int(torch.randint(10, 40, (1,), generator=g))
        src = torch.arange(atoms - 1)
        ring = torch.stack([torch.cat([src, src + 1]), torch.cat([src + 1, src])])
        x = torch.stack([torch.randint(0, 9, (atoms,), generator=g), torch.zeros(atoms, dtype=torch.long)], 1)
        e = torch.stack([torch.randint(0, 4, (ring.shape[1],), generator=g), torch.zeros(ring.shape[1], dtype=torch.long)], 1)
        graphs.append(Data(x=x, edge_index=ring, edge_attr=e))
    return Batch.from_data_list(graphs)


def _trainer(kind, num_meta, m, k, variant="lazy"):
    problem = Problem(kind, num_meta, variant=variant)
    params, head, phi = problem.initial()
    return MetaPretrainer(
        problem, params, head, phi,
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
        meta_optimizer=lambda ps: (LazyAdam if variant == "lazy" else torch.optim.Adam)(ps, lr=1e-2),
        inner_optimizer=sgd(0.1), solver=Neumann(steps=m, alpha=1e-3),
        schedule=MetaSchedule(interval=1, unroll_steps=k),
    )


def time_ratio(kind, num_meta, m, k, reps, variant="lazy"):
    t = _trainer(kind, num_meta, m, k, variant)
    t.pretrain_step(), t.meta_step()  # warm-up
    pt, meta = [], []
    for _ in range(reps):  # interleaved, so drift hits both alike
        s = time.perf_counter()
        t.pretrain_step()
        pt.append(time.perf_counter() - s)
        s = time.perf_counter()
        t.meta_step()
        meta.append(time.perf_counter() - s)
    return statistics.median(pt), statistics.median(meta)


def time_sweep(kind, sizes, m, k, reps, variant="lazy"):
    """{size: (PT step s, meta-step s)}, medians over ``reps`` rounds that visit every size in turn
    (rotating the order), so load from other processes hits every size alike."""
    trainers = {p: _trainer(kind, p, m, k, variant) for p in sizes}
    for t in trainers.values():
        t.pretrain_step(), t.meta_step()  # warm-up
    pt, meta = {p: [] for p in sizes}, {p: [] for p in sizes}
    for r in range(reps):
        for p in sizes[r % len(sizes):] + sizes[: r % len(sizes)]:
            t = trainers[p]
            s = time.perf_counter()
            t.pretrain_step()
            pt[p].append(time.perf_counter() - s)
            s = time.perf_counter()
            t.meta_step()
            meta[p].append(time.perf_counter() - s)
    return {p: (statistics.median(pt[p]), statistics.median(meta[p])) for p in sizes}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(kind, num_meta, m, k, variant="lazy"):
    """In a fresh process: extra peak RSS of one PT step and of one meta-step.

    Both steps run once first (allocator and kernel warm-up); then for each, the
    kernel's RSS high-water mark is reset (``/proc/self/clear_refs`` = 5) and the
    step's peak is VmHWM minus the RSS before it. The parent sets a fixed
    MALLOC_MMAP_THRESHOLD_ so freed tensors go back to the OS and RSS tracks
    live tensor memory.
    """
    t = _trainer(kind, num_meta, m, k, variant)
    t.pretrain_step(), t.meta_step()
    out = {}
    for which, step in (("pt", t.pretrain_step), ("meta", t.meta_step)):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        step()
        out[which] = (_status_kb("VmHWM") - base) * 1024
    return out


def peak_ratio(kind, num_meta, m, k, variant="lazy"):
    code = (
        "import sys, json; sys.path.insert(0, 'benchmarks'); import hypergrad_cost as h; "
        f"print(json.dumps(h.peak_child({kind!r}, {num_meta}, {m}, {k}, {variant!r})))"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["pt"], out["meta"]


def markdown(result):
    """The 10 … 1e6 sweep (M = K = 1) as a table, and the flatness ratios."""
    lines = ["# Meta-step cost vs number of example weights (M = K = 1)", "",
             f"`{result['command']}` (commit {result['commit'][:10]}, {result['machine']['threads']} thread(s))", "",
             "| model | variant | example weights | PT step s | meta-step s | meta peak MB |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["M"] == 1 and r["K"] == 1:
            lines.append(f"| {r['model']} | {r.get('variant', 'lazy')} | {r['meta_params']:,} | {r['pt_step_s']} | "
                         f"{r['meta_step_s']} | {r.get('meta_peak_mb', '')} |")
    lines += ["", "| model/variant | time 1e6 / 10 | memory 1e6 / 10 |", "|---|---|---|"]
    for name, f in result["flatness"].items():
        lines.append(f"| {name} | {f['time_1e6_over_10']} | {f.get('memory_1e6_over_10', '')} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,gin")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    ap.add_argument("--variants", default="lazy", help="lazy (row-sparse + LazyAdam) and/or dense (the old path)")
    ap.add_argument("--flatness-only", action="store_true", help="only the 10 … 1e6 sweep at M = K = 1")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    grid = [] if args.flatness_only else [(10**3, m, k) for k in (1, 5) for m in (0, 1, 5, 20)]
    grid += [(p, 1, 1) for p in (10, 10**3, 10**5, 10**6) if args.flatness_only or p != 10**3]
    variants = args.variants.split(",")
    sweep = [p for p, m, k in grid if m == 1 and k == 1]
    rows = []
    for kind in args.models.split(","):
        # the size sweep is timed interleaved (time_sweep); the M, K grid one setting at a time
        swept = {v: time_sweep(kind, sweep, 1, 1, args.reps, v) for v in variants}
        for (num_meta, m, k), variant in itertools.product(grid, variants):
            if (m, k) == (1, 1) and num_meta in sweep:
                pt, meta = swept[variant][num_meta]
            else:
                pt, meta = time_ratio(kind, num_meta, m, k, args.reps, variant)
            row = {"model": kind, "variant": variant, "meta_params": num_meta, "M": m, "K": k,
                   "pt_step_s": round(pt, 5), "meta_step_s": round(meta, 5), "time_ratio": round(meta / pt, 3)}
            if not args.no_memory:
                mpt, mmeta = peak_ratio(kind, num_meta, m, k, variant)
                row.update({"pt_peak_mb": round(mpt / 2**20, 1), "meta_peak_mb": round(mmeta / 2**20, 1),
                            "memory_ratio": round(mmeta / max(mpt, 1), 3)})
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    flat = {}
    for kind, variant in itertools.product(args.models.split(","), variants):
        by_p = {r["meta_params"]: r for r in rows
                if r["model"] == kind and r["variant"] == variant and r["M"] == 1 and r["K"] == 1}
        name = kind if variant == "lazy" else f"{kind}_{variant}"
        flat[name] = {"time_1e6_over_10": round(by_p[10**6]["meta_step_s"] / by_p[10]["meta_step_s"], 3)}
        if not args.no_memory:
            flat[name]["memory_1e6_over_10"] = round(by_p[10**6]["meta_peak_mb"] / max(by_p[10]["meta_peak_mb"], 0.1), 3)
    result = {
        "command": "python " + " ".join(sys.argv),
        "commit": source_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "rows": rows,
        "flatness": flat,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(markdown(result))


if __name__ == "__main__":
    main()
