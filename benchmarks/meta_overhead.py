"""Cost of meta-learning on the molecules GIN: meta-training wall time / plain PT wall time.

Both runs take the same PT steps on the same ChEMBL batches (B3DB setting, 35,633 molecules ×
30 tasks), the meta run with the paper's defaults: a meta-step every 10 PT steps, K = 1 unrolled
head-only FT step, M = 1 Neumann term (α = PT lr), φ = the 30 task weights. Everything is timed in
one process, in chunks of 10 PT steps (the meta run's chunk holds its one meta-step), the plain,
"before" and "after" trainers interleaved in rotating order on the same batch indices; ratios are
medians of per-chunk ratios. "before" is the trainer with the default strategy (a second PT
forward/backward inside the meta-step, as metapt did until this benchmark), "after" ``strategy=ReusePTGraph()``.

The floor. A meta-step must compute, on batches of 64:
  g    = dL_V/dθ through the K = 1 unrolled FT step (FT forward + val forward, backward to θ),
  hvp  = M = 1 Hessian-vector product (a double backward through the PT gradient's graph),
  mix  = one mixed product (∂²L_PT/∂φ∂θ)ᵀx (a backward from that graph to φ),
and the graph of ∇θ L_PT must exist: the cheapest way is to build it in the PT step that has to
differentiate L_PT anyway, which costs only cg = (forward + backward with create_graph) − (forward
+ backward). Each primitive is timed alone on the same batch, in the same process, as a plain PT
step (forward + backward + Adam); floor (PT steps per meta-step) = (g + hvp + mix + max(cg, 0)) / pt,
and the floor of the ratio is 1 + floor / interval.

Peak memory (in a fresh subprocess with a fixed MALLOC_MMAP_THRESHOLD_, so RSS tracks live
tensors) is the RSS high-water mark over a chunk minus the RSS before it, for plain PT and for
meta-training with the 30 task weights and with per-example weights over the 35,633 molecules and
over 1e6 entries.

    OMP_NUM_THREADS=1 python benchmarks/meta_overhead.py --out benchmarks/results/meta_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from metapt import MetaPretrainer, MetaSchedule
from metapt.strategy import ReusePTGraph
from metapt.domains.molecules.models import GINEncoder
from metapt.domains.molecules.problem import MoleculesProblem, WeightingConfig, load_molecule_data
from metapt.hypergrad import Neumann, pretraining_hypergradient, sgd, unrolled_finetune
from metapt.metaparams import weight_logits
from _results import source_commit  # noqa: E402  (HEAD; refused if metapt comes from another tree)

INTERVAL = 10  # the paper's interval (meta.interval)
PT_LR = 1e-3
#: "hu2020": Hu et al.'s GIN, batch norm as in their code (GINEncoder.hu2020()); "small": the CPU
#: default of `metapt run molecules` (3 × 64, layer norm).
SIZES = {
    "hu2020": {"num_layers": 5, "emb_dim": 300, "dropout": 0.2, "norm": "batch"},
    "small": {"num_layers": 3, "emb_dim": 64, "dropout": 0.2, "norm": "layer"},
}
PHI_KINDS = {"task30": None, "example35633": "all", "example1e6": 10**6}


def make_trainer(data, size: str, *, meta: bool, reuse: bool = True, phi_kind: str = "task30", seed: int = 0):
    torch.manual_seed(seed)  # every trainer starts from the same encoder
    weighting = WeightingConfig() if phi_kind == "task30" else WeightingConfig(task_weights=False, example_weights=True)
    problem = MoleculesProblem(data, GINEncoder(**SIZES[size]), weighting, seed=seed)
    phi = problem.initial_metaparams()
    if isinstance(PHI_KINDS[phi_kind], int):  # a longer per-example vector; rows index its head
        phi["example_logits"] = weight_logits(PHI_KINDS[phi_kind])
    trainer = MetaPretrainer(
        problem, problem.initial_params(), problem.initial_head(), phi,
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=PT_LR),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
        inner_optimizer=sgd(0.1),
        solver=Neumann(steps=1, alpha=PT_LR),
        schedule=MetaSchedule(interval=INTERVAL if meta else 10**9, unroll_steps=1),
        strategy=ReusePTGraph() if reuse else None,
    )
    return trainer


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since ``start``: CPU time is this process's own, so other load on the
    machine inflates it far less than wall time; with one thread they agree on an idle machine."""
    wall, cpu = _now()
    return wall - start[0], cpu - start[1]


def chunk(trainer) -> tuple[float, float]:
    """(wall, CPU) time of the next INTERVAL PT steps of ``trainer.run`` (with its meta-step, if any)."""
    start = _now()
    trainer.run_until(trainer.step + INTERVAL)
    return _since(start)


class Primitives:
    """The pieces a meta-step must compute, each timed alone on one batch triple."""

    def __init__(self, data, size: str, theta, seed: int = 0):
        torch.manual_seed(seed)
        self.problem = MoleculesProblem(data, GINEncoder(**SIZES[size]), WeightingConfig(), seed=seed)
        self.theta = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
        self.phi = {k: v.requires_grad_(True) for k, v in self.problem.initial_metaparams().items()}
        self.head = self.problem.initial_head()
        self.opt = torch.optim.Adam(list(self.theta.values()), lr=PT_LR)
        self.inner = sgd(0.1)

    def time_all(self, index: int) -> dict[str, float]:
        p = self.problem
        pt_batch, ft_batch, val_batch = p.pretrain_batch(index), p.finetune_batch(index), p.metaval_batch(index)
        th = list(self.theta.values())
        phi_const = {k: v.detach() for k, v in self.phi.items()}
        out = {}

        def clock(name, fn):
            start = _now()
            r = fn()
            out[name] = _since(start)
            return r

        def pt_step():  # what MetaPretrainer.pretrain_step does: forward, backward, Adam
            self.opt.zero_grad(set_to_none=True)
            p.pretrain_loss(self.theta, phi_const, pt_batch).backward()
            self.opt.step()

        def fb():
            return torch.autograd.grad(p.pretrain_loss(self.theta, phi_const, pt_batch), th)

        def fb_graph():
            return torch.autograd.grad(p.pretrain_loss(self.theta, self.phi, pt_batch), th, create_graph=True)

        def g():
            head = unrolled_finetune(lambda h, k: p.finetune_loss(self.theta, h, ft_batch), self.head, self.inner, 1)
            return torch.autograd.grad(p.finetune_loss(self.theta, head, val_batch), th, allow_unused=True)

        clock("pt", pt_step)
        clock("fb", fb)
        grads = clock("fb_graph", fb_graph)
        gv = [torch.zeros_like(t) if x is None else x for t, x in zip(th, clock("g", g))]
        clock("hvp", lambda: torch.autograd.grad(grads, th, gv, retain_graph=True))
        clock("mix", lambda: torch.autograd.grad(grads, list(self.phi.values()), gv, retain_graph=True))
        clock("fused", lambda: torch.autograd.grad(grads, th + list(self.phi.values()), gv, retain_graph=True))
        return out


def time_size(data, size: str, reps: int) -> dict:
    plain = make_trainer(data, size, meta=False)
    before = make_trainer(data, size, meta=True, reuse=False)
    after = make_trainer(data, size, meta=True, reuse=True)
    trainers = {"plain": plain, "before": before, "after": after}
    for t in trainers.values():  # warm-up: allocator, kernels, one meta-step each
        chunk(t)
    prim = Primitives(data, size, plain.params)
    prim.time_all(0)
    times = {k: [] for k in trainers}
    prims = []
    names = list(trainers)
    for r in range(reps):
        order = names[r % 3:] + names[: r % 3]  # rotate, so drift and position hit all alike
        for name in order:
            times[name].append(chunk(trainers[name]))
        prims.append(prim.time_all(plain.step - 1))
        print(f"  {size} rep {r}: " + ", ".join(f"{k} {v[-1][0]:.3f}s wall {v[-1][1]:.3f}s cpu" for k, v in times.items()),
              file=sys.stderr, flush=True)
    assert before.meta_step_count == after.meta_step_count == reps + 1 and plain.meta_step_count == 0
    row = {"encoder": {**SIZES[size]}, "reps": reps}
    for c, clock in enumerate(("wall", "cpu")):
        def med_ratio(a, b):
            return statistics.median(x[c] / y[c] for x, y in zip(times[a], times[b]))

        floor_units = statistics.median(
            (p["g"][c] + p["hvp"][c] + p["mix"][c] + max(p["fb_graph"][c] - p["fb"][c], 0.0)) / p["pt"][c] for p in prims
        )
        floor_ratio = 1 + floor_units / INTERVAL
        out = {
            "pt_step_s": round(statistics.median(x[c] for x in times["plain"]) / INTERVAL, 4),
            "floor": {
                "primitive_s": {k: round(statistics.median(p[k][c] for p in prims), 4) for k in prims[0]},
                # per rep, in units of that rep's PT step on the same batch
                "primitive_pt_steps": {k: round(statistics.median(p[k][c] / p["pt"][c] for p in prims), 3) for k in prims[0]},
                "create_graph_extra_pt_steps": round(
                    statistics.median((p["fb_graph"][c] - p["fb"][c]) / p["pt"][c] for p in prims), 3),
                "meta_step_pt_steps": round(floor_units, 3),
                "ratio": round(floor_ratio, 3),
            },
        }
        for name in ("before", "after"):
            ratio = med_ratio(name, "plain")
            out[name] = {
                "ratio": round(ratio, 3),
                "meta_step_pt_steps": round(INTERVAL * (ratio - 1), 3),
                "ratio_over_floor": round(ratio / floor_ratio, 3),
            }
        out["after_over_before"] = round(med_ratio("after", "before"), 3)
        row[clock] = out
    return row


def agreement(data, size: str, trials: int = 5) -> dict | None:
    """How far the graph-reusing hypergradient (H and the mixed term at θ_t, the PT step's point and
    dropout mask; g at θ_{t+1}) is from the plain one (all at θ_{t+1}, a fresh dropout mask), next
    to two references: two plain ones with different dropout masks (the estimator's own noise), and
    the reusing one against the same estimator with a fresh mask at θ_t (``reuse′``)."""
    from metapt.hypergrad import pretrain_graph

    t = make_trainer(data, size, meta=True)
    t.run_until(30)  # a few meta-steps in, so φ is not uniform
    p = t.problem
    cos = torch.nn.functional.cosine_similarity
    rows = []
    for j in range(trials):
        batch = p.pretrain_batch(t.step)
        val, ft = p.metaval_batch(j), p.finetune_batch(j)

        def meta_loss(theta):
            head = unrolled_finetune(lambda h, k: p.finetune_loss(theta, h, ft), t.head, t.inner, 1)
            return p.finetune_loss(theta, head, val)

        def pt_loss(th, ph):
            return p.pretrain_loss(th, ph, batch)

        graph = pretrain_graph(pt_loss, t.params, t.metaparams)  # θ_t, as the PT step builds it
        t.pt_opt.zero_grad(set_to_none=True)
        for k, v in t.params.items():
            v.grad = graph.grad[k].detach()
        t.pt_opt.step()  # θ_{t+1}
        t.step += 1
        reuse, _ = pretraining_hypergradient(pt_loss, meta_loss, t.params, t.metaparams, t.solver, graph=graph)
        plain1, _ = pretraining_hypergradient(pt_loss, meta_loss, t.params, t.metaparams, t.solver)
        plain2, _ = pretraining_hypergradient(pt_loss, meta_loss, t.params, t.metaparams, t.solver)
        fresh = pretrain_graph(pt_loss, graph.theta, t.metaparams)  # θ_t again, another dropout mask
        reuse2, _ = pretraining_hypergradient(pt_loss, meta_loss, t.params, t.metaparams, t.solver, graph=fresh)
        a, b, c, d = (h["task_logits"].double() for h in (reuse, plain1, plain2, reuse2))
        rows.append({"cos_reuse_plain": float(cos(a, b, dim=0)), "cos_plain_plain": float(cos(b, c, dim=0)),
                     "cos_reuse_reuse": float(cos(a, d, dim=0)),
                     "rel_reuse_plain": float((a - b).norm() / b.norm()), "rel_plain_plain": float((b - c).norm() / c.norm()),
                     "rel_reuse_reuse": float((a - d).norm() / d.norm())})
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}


# ---- peak memory, in a fresh process ----------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(size: str, max_pretrain: int | None) -> dict:
    """Extra peak RSS (MiB) of one chunk, per variant; run by :func:`peak_memory` in a fresh process."""
    torch.set_num_threads(1)
    data = load_molecule_data("b3db", max_pretrain=max_pretrain)
    out = {}
    variants = [("plain", False, True, "task30")]
    variants += [(f"{which}/{kind}", True, reuse, kind) for kind in PHI_KINDS for which, reuse in (("before", False), ("after", True))]
    for name, meta, reuse, kind in variants:
        t = make_trainer(data, size, meta=meta, reuse=reuse, phi_kind=kind)
        chunk(t)  # warm-up
        peaks = []
        for _ in range(2):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the RSS high-water mark
            base = _status_kb("VmRSS")
            chunk(t)
            peaks.append((_status_kb("VmHWM") - base) / 1024)
        out[name] = round(min(peaks), 1)
        del t
    return out


def peak_memory(size: str, max_pretrain: int | None) -> dict:
    code = (
        "import sys, json; sys.path.insert(0, 'benchmarks'); import meta_overhead as m; "
        f"print(json.dumps(m.peak_child({size!r}, {max_pretrain!r})))"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    mb = json.loads(res.stdout.strip().splitlines()[-1])
    plain = mb["plain"]
    return {
        "extra_peak_mib": mb,
        "over_plain": {k: round(v / max(plain, 0.1), 3) for k, v in mb.items() if k != "plain"},
        "after_1e6_over_30": round(mb["after/example1e6"] / max(mb["after/task30"], 0.1), 3),
    }


def markdown(result: dict) -> str:
    lines = [
        "# Cost of meta-learning (molecules GIN, B3DB setting)",
        "",
        "Ratio = meta-training time / plain PT time for the same PT steps; PT steps / meta-step = 10·(ratio − 1). "
        "Floor = g + HVP + mixed + create_graph extra, each primitive timed alone in PT-step units (see the "
        "script's docstring); before = a second PT forward/backward in the meta-step (the default strategy), "
        "after = H and the mixed term from the PT step's own gradient graph (the default). CPU time is this "
        "process's own: the machine was shared, so wall time carries other jobs' load.",
        "",
        f"`{result['command']}` — {result['machine']['threads']} thread(s), torch {result['machine']['torch']}. "
        f"Meta-step every {INTERVAL} PT steps, K = 1 head-only unroll, M = 1 Neumann, φ = 30 task weights; "
        "ratios are medians over interleaved chunks of 10 PT steps.",
        "",
        "| encoder | clock | PT step | floor (PT steps / meta-step) | floor ratio | before: ratio (PT steps / meta-step) "
        "| after: ratio (PT steps / meta-step) | after / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, row in result["sizes"].items():
        e = row["encoder"]
        for clock in ("wall", "cpu"):
            r = row[clock]
            lines.append(
                f"| {size} ({e['num_layers']}×{e['emb_dim']}, {e['norm']} norm) | {clock} | {r['pt_step_s'] * 1e3:.0f} ms | "
                f"{r['floor']['meta_step_pt_steps']:.2f} | {r['floor']['ratio']:.3f} | "
                f"{r['before']['ratio']:.3f} ({r['before']['meta_step_pt_steps']:.2f}) | "
                f"{r['after']['ratio']:.3f} ({r['after']['meta_step_pt_steps']:.2f}) | {r['after']['ratio_over_floor']:.3f} |"
            )
    lines += ["", "Primitives (PT-step units, CPU time, same batch, same process; median over reps):", "",
              "| encoder | g (K=1 unroll + val, backward) | HVP | mixed | fused (θ, φ) | create_graph extra |", "|---|---|---|---|---|---|"]
    for size, row in result["sizes"].items():
        u = row["cpu"]["floor"]["primitive_pt_steps"]
        lines.append(f"| {size} | {u['g']:.2f} | {u['hvp']:.2f} | {u['mix']:.2f} | {u['fused']:.2f} | "
                     f"{row['cpu']['floor']['create_graph_extra_pt_steps']:.2f} |")
    mem = {s: r["memory"] for s, r in result["sizes"].items() if "memory" in r}
    if mem:
        lines += ["", "Extra peak RSS over one chunk (MiB):", "",
                  "| encoder | plain | before, 30 task w. | after, 30 task w. | after, 35,633 example w. | after, 1e6 example w. | before, 1e6 |",
                  "|---|---|---|---|---|---|---|"]
        for size, m in mem.items():
            x = m["extra_peak_mib"]
            lines.append(f"| {size} | {x['plain']} | {x['before/task30']} | {x['after/task30']} | {x['after/example35633']} | "
                         f"{x['after/example1e6']} | {x['before/example1e6']} |")
    agree = {s: r["agreement"] for s, r in result["sizes"].items() if r.get("agreement")}
    if agree:
        lines += ["", "Task-weight hypergradient, median of 5 PT batches: reuse = H and mixed term from the PT step's graph "
                  "(θ_t, its dropout mask), g at θ_{t+1}; plain, plain′ = a fresh PT forward at θ_{t+1} (two dropout masks); "
                  "reuse′ = a fresh PT forward at θ_t (another mask):", "",
                  "| encoder | cos(reuse, plain) | cos(plain, plain′) | cos(reuse, reuse′) | ‖reuse − plain‖/‖plain‖ "
                  "| ‖plain − plain′‖/‖plain′‖ | ‖reuse − reuse′‖/‖reuse′‖ |",
                  "|---|---|---|---|---|---|---|"]
        for size, a in agree.items():
            lines.append(f"| {size} | {a['cos_reuse_plain']} | {a['cos_plain_plain']} | {a['cos_reuse_reuse']} | "
                         f"{a['rel_reuse_plain']} | {a['rel_plain_plain']} | {a['rel_reuse_reuse']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="hu2020,small")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--small-reps", type=int, default=15, help="reps for the small encoder (its chunks are short)")
    ap.add_argument("--max-pretrain", type=int, default=None, help="subset of the 35,633 ChEMBL molecules")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-agreement", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path; a .md table is written next to it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_molecule_data("b3db", max_pretrain=args.max_pretrain)
    sizes = {}
    for size in args.sizes.split(","):
        row = time_size(data, size, args.small_reps if size == "small" else args.reps)
        if not args.no_agreement:
            try:
                row["agreement"] = agreement(data, size)
            except ImportError:  # a metapt without graph reuse
                row["agreement"] = None
        if not args.no_memory:
            row["memory"] = peak_memory(size, args.max_pretrain)
        sizes[size] = row
        print(json.dumps({size: row}), file=sys.stderr, flush=True)
    result = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "commit": source_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "pretrain_molecules": len(data.pretrain_positions),
        "sizes": sizes,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(result))


if __name__ == "__main__":
    main()
