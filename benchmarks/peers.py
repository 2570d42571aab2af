"""The same pre-training hypergradient with metapt, Betty and TorchOpt, side by side.

Issue 7, "side by side with peers". One problem, the paper's: multitask pre-training of a GIN
encoder (``metapt.domains.molecules.models.GINEncoder``) on random molecules with per-task
weights w = 2·sigmoid(φ) on the per-task BCE; the meta-loss is the fine-tuning BCE on a
validation batch after K unrolled SGD steps of a linear head (head only, from the current θ);
H⁻¹ by M Neumann terms with α = the PT learning rate (paper: K = 1, M = 1), or by N
conjugate-gradient iterations. Every method sees the same θ, φ, head and batches (same seed)
and computes

    dL_V/dφ = − (∂²L_PT/∂φ∂θ)ᵀ · H⁻¹ · dL_V/dθ      (L_V does not depend on φ directly here)

through its own public API:

- ``metapt``     ``MetaPretrainer.meta_step`` (unroll, hypergradient, Adam step on φ); the
                 reference of every ratio;
- ``metapt-fn``  ``metapt.hypergrad.pretraining_hypergradient`` called directly;
- ``betty``      ``betty-ml`` 0.2.1: an ``ImplicitProblem`` for pre-training (config ``type =
                 "neumann"`` or ``"cg"``) under an ``ImplicitProblem`` for φ, wired by ``Engine``;
                 a meta-step is the φ problem's ``one_step_descent`` (what ``Engine`` runs);
- ``torchopt``   ``torchopt`` 0.7.3: ``torchopt.diff.implicit.custom_root`` on the optimality
                 condition ∇θ L_PT(θ, φ) = 0 (``torch.func.grad``), solved by
                 ``torchopt.linear_solve.solve_inv(ns=True, maxiter=M, alpha=α)`` or
                 ``solve_cg(maxiter=N)``, and the head unrolled with ``torchopt.sgd``
                 (``inplace=False``).

Two units are timed. A *meta-step alone* (the rows above: ``meta_step()`` with no PT step before
it, the like-for-like cost of one hypergradient) and a *cycle*, one PT step then one meta-step,
what Algorithm 1 runs every ``interval`` PT steps (``--cycle-methods``): ``metapt`` is
``pretrain_step(); meta_step()`` with ``reuse_pt_graph=True`` (opt-in: the PT step keeps its
gradient graph and the meta-step takes H and ∂²L_PT/∂φ∂θ from it; the reference of the cycle
ratios), ``metapt-noreuse`` the same with ``reuse_pt_graph=False``, ``betty`` ``Engine.train_step()``
(the PT problem's Adam step, which then steps the meta problem) and ``torchopt`` a ``torchopt.Adam``
step on θ then the meta-step above.

Times are medians over interleaved repetitions in one process (one warm-up step each, not
counted); peak memory is, per method, in a fresh subprocess, the kernel's RSS high-water mark
during one meta-step over the RSS just before it (``/proc/self/clear_refs``; glibc
``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors go back to the OS). Agreement is the cosine
similarity and relative L2 error of each hypergradient to metapt's, from the same state, in float32
for the timed settings and in float64 for a stress setting whose α makes αH visible (M = 5) and for
CG. Peers are not metapt dependencies; they live in their own venv (``make bench-peers``):

    python3 -m venv benchmarks/.peers-venv
    benchmarks/.peers-venv/bin/pip install torch==2.13.0
    benchmarks/.peers-venv/bin/pip install -e . -r benchmarks/peers-requirements.txt
    benchmarks/.peers-venv/bin/pip install --no-deps --ignore-requires-python betty-ml==0.2.1
    OMP_NUM_THREADS=1 benchmarks/.peers-venv/bin/python benchmarks/peers.py \\
        --out benchmarks/results/peers.json --md benchmarks/results/peers.md

(about 7.5 minutes on an otherwise quiet 2-core machine, about 15 on a loaded one.)
``--render peers.json --md peers.md`` re-renders the Markdown from a results file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import io
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metapt import MetaPretrainer, MetaSchedule
from metapt.strategy import ReusePTGraph, Strategy
from metapt.hypergrad import (
    ConjugateGradient,
    Neumann,
    pretraining_hypergradient,
    sgd,
    unrolled_finetune,
)
from _results import source_commit  # noqa: E402  (HEAD; refused if metapt comes from another tree)

# ---------------------------------------------------------------------------------------------
# The problem
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    layers: int = 3
    emb: int = 64
    tasks: int = 30
    batch: int = 64
    K: int = 1  # unrolled head-only SGD steps
    solver: str = "neumann"  # "cg", or "identity" (H⁻¹ ≈ αI; Betty: its finite-difference "darts")
    M: int = 1  # Neumann terms after the first (= HVPs)
    cg_iters: int = 5
    damping: float = 0.0  # λ: CG solves (H + λI) x = g (the random-init GIN's H is indefinite)
    alpha: float = 1e-3  # Neumann α = PT lr (paper)
    pt_lr: float = 1e-3
    ft_lr: float = 0.1
    meta_lr: float = 1e-2
    dtype: str = "float32"
    seed: int = 0

    @property
    def name(self) -> str:
        how = {"neumann": f"M={self.M}, α={self.alpha:.3g}", "cg": f"CG N={self.cg_iters}, λ={self.damping:g}",
               "identity": f"H⁻¹≈αI, α={self.alpha:.3g}"}[self.solver]
        return f"GIN {self.layers}x{self.emb}, K={self.K}, {how}, {self.dtype}"


def _random_molecules(n: int, g: torch.Generator):
    """n chain molecules of 10–39 atoms with random atom and bond types (a PyG Batch)."""
    from torch_geometric.data import Batch, Data

    graphs = []
    for _ in range(n):
        atoms = int(torch.randint(10, 40, (1,), generator=g))
        src = torch.arange(atoms - 1)
        chain = torch.stack([torch.cat([src, src + 1]), torch.cat([src + 1, src])])
        x = torch.stack([torch.randint(0, 9, (atoms,), generator=g), torch.zeros(atoms, dtype=torch.long)], 1)
        bonds = torch.randint(0, 4, (atoms - 1,), generator=g).repeat(2)
        e = torch.stack([bonds, torch.zeros_like(bonds)], 1)
        graphs.append(Data(x=x, edge_index=chain, edge_attr=e))
    return Batch.from_data_list(graphs)


def _encoder(s: Setting) -> nn.Module:
    """GINEncoder with dropout off and batch norm on batch statistics only (no running stats).

    Every method must evaluate the same deterministic function: dropout masks would differ
    between methods (and between a method's forwards), and running-stat updates would make the
    result depend on how many PT forwards a method does. The cost is that of the real model.
    """
    from metapt.domains.molecules.models import GINEncoder

    enc = GINEncoder(num_layers=s.layers, emb_dim=s.emb, dropout=0.0, norm="batch")
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return enc.train()


class Problem:
    """θ = encoder + PT head, φ = task logits, ψ = linear FT head; fixed batches."""

    def __init__(self, s: Setting):
        self.s = s
        dt = getattr(torch, s.dtype)
        torch.manual_seed(s.seed)
        g = torch.Generator().manual_seed(s.seed)
        self.encoder = _encoder(s).to(dt)
        self.pt_head = nn.Linear(s.emb, s.tasks).to(dt)
        self.pt_batch = (_random_molecules(s.batch, g), (torch.rand(s.batch, s.tasks, generator=g) < 0.3).to(dt))
        self.ft_batch = (_random_molecules(s.batch, g), (torch.rand(s.batch, generator=g) < 0.5).to(dt))
        self.val_batch = (_random_molecules(s.batch, g), (torch.rand(s.batch, generator=g) < 0.5).to(dt))
        self.head0 = {"weight": 0.1 * torch.randn(s.emb, generator=g).to(dt), "bias": torch.zeros((), dtype=dt)}
        self.phi0 = {"task_logits": 0.5 * torch.randn(s.tasks, generator=g).to(dt)}

    def theta0(self) -> dict:
        th = {f"enc.{k}": v.detach().clone() for k, v in self.encoder.named_parameters()}
        th.update({f"pt.{k}": v.detach().clone() for k, v in self.pt_head.named_parameters()})
        return th

    # the math, shared by metapt and TorchOpt (Betty's modules compute the same thing)
    def embed(self, theta, graphs):
        enc = {k[4:]: v for k, v in theta.items() if k.startswith("enc.")}
        return functional_call(self.encoder, enc, (graphs,))

    def pt_loss(self, theta, phi):
        graphs, y = self.pt_batch
        logits = self.embed(theta, graphs) @ theta["pt.weight"].T + theta["pt.bias"]
        return pt_loss_from_logits(logits, y, phi["task_logits"])

    def ft_loss(self, theta, head, batch):
        graphs, y = batch
        return F.binary_cross_entropy_with_logits(self.embed(theta, graphs) @ head["weight"] + head["bias"], y)


def pt_loss_from_logits(logits, y, task_logits):
    """mean over examples and tasks of 2·sigmoid(φ_t)·BCE(z_it, y_it) (metapt's masked_bce, all observed)."""
    w = 2 * torch.sigmoid(task_logits)
    return (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).mean()


# ---------------------------------------------------------------------------------------------
# Methods: each runner's step() takes one meta-step (including the Adam step on φ and keeping
# the unrolled head for the next meta-step) and returns the hypergradient, detached.
# ---------------------------------------------------------------------------------------------


class _MetaptProblem:
    def __init__(self, p: Problem):
        self.p = p

    def pretrain_loss(self, params, metaparams, batch):
        return self.p.pt_loss(params, metaparams)

    def finetune_loss(self, params, head, batch):
        return self.p.ft_loss(params, head, self.p.ft_batch if batch == "ft" else self.p.val_batch)

    def pretrain_batch(self, i):
        return "pt"

    def finetune_batch(self, i):
        return "ft"

    def metaval_batch(self, i):
        return "val"

    def describe_metaparams(self, metaparams):
        return {}


def _metapt_solver(s: Setting):
    if s.solver in ("neumann", "identity"):
        return Neumann(steps=s.M if s.solver == "neumann" else 0, alpha=s.alpha, divergence_factor=1e30)
    return ConjugateGradient(max_iter=s.cg_iters, tol=0.0, damping=s.damping)


class MetaptTrainer:
    """metapt's user-facing meta-step: ``MetaPretrainer.meta_step``.

    ``cycle()`` is what Algorithm 1 runs every ``interval`` PT steps: ``pretrain_step()``
    then ``meta_step()``; with ``reuse_pt_graph=True`` that PT step keeps its
    gradient graph and the meta-step takes H and the mixed term from it. ``step()`` alone has
    no such PT step before it, so it always runs its own PT forward/backward.
    """

    def __init__(self, s: Setting, reuse_pt_graph: bool = True):
        p = Problem(s)
        self.t = MetaPretrainer(
            _MetaptProblem(p), p.theta0(), p.head0, p.phi0,
            pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=s.pt_lr),
            meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=s.meta_lr),
            inner_optimizer=sgd(s.ft_lr), solver=_metapt_solver(s),
            schedule=MetaSchedule(interval=1, unroll_steps=s.K),
            strategy=ReusePTGraph() if reuse_pt_graph else None,
        )
        self.reuse = reuse_pt_graph

    def step(self):
        self.last = self.t.meta_step()
        if self.last["solver_diverged"]:
            raise RuntimeError(f"metapt's solve diverged (the update was skipped): {self.last}")
        return {k: v.grad.detach().clone() for k, v in self.t.metaparams.items()}

    def cycle(self):
        self.t.pretrain_step()
        return self.step()

    def pt_step(self):
        """A plain PT step (no graph kept: with interval = 1 every step would keep one)."""
        reuse, self.t.strategy = self.t.strategy, Strategy()
        try:
            self.t.pretrain_step()
        finally:
            self.t.strategy = reuse


class MetaptFn:
    """``pretraining_hypergradient`` called directly, then Adam on φ."""

    forward_over_reverse = False

    def __init__(self, s: Setting):
        self.s, self.p = s, Problem(s)
        self.theta = {k: v.requires_grad_(True) for k, v in self.p.theta0().items()}
        self.phi = {k: v.clone().requires_grad_(True) for k, v in self.p.phi0.items()}
        self.head = dict(self.p.head0)
        self.opt = torch.optim.Adam(list(self.phi.values()), lr=s.meta_lr)
        self.solver, self.inner = _metapt_solver(s), sgd(s.ft_lr)

    def step(self):
        p, out = self.p, {}

        def meta_loss(theta):
            head = unrolled_finetune(lambda h, k: p.ft_loss(theta, h, p.ft_batch), self.head, self.inner, self.s.K)
            out["head"] = head
            return p.ft_loss(theta, head, p.val_batch)

        hyper, self.info = pretraining_hypergradient(p.pt_loss, meta_loss, self.theta, self.phi, self.solver,
                                                     forward_over_reverse=self.forward_over_reverse)
        self.opt.zero_grad(set_to_none=True)
        for k, v in self.phi.items():
            v.grad = hyper[k]
        self.opt.step()
        self.head = {k: v.detach() for k, v in out["head"].items()}
        return {k: v.detach().clone() for k, v in hyper.items()}


class MetaptFwdRev(MetaptFn):
    """``pretraining_hypergradient(..., forward_over_reverse=True)``: HVPs as JVPs of the gradient."""

    forward_over_reverse = True


class TorchOpt:
    """TorchOpt: ``custom_root`` on ∇θ L_PT = 0 + its linear solvers; head unrolled with ``torchopt.sgd``.

    ``cycle()``: a PT step with ``torchopt.Adam`` on θ (forward, backward, step), then ``step()``.
    """

    def __init__(self, s: Setting):
        import torchopt
        from torchopt.diff.implicit import custom_root

        self.s, self.p, self.torchopt = s, Problem(s), torchopt
        th = self.p.theta0()
        self.keys = list(th)
        self.theta = tuple(th[k].requires_grad_(True) for k in self.keys)  # leaves of the PT optimiser
        self.phi = tuple(v.clone().requires_grad_(True) for v in self.p.phi0.values())
        self.pt_opt = torchopt.Adam(self.theta, lr=s.pt_lr)
        self.head = tuple(self.p.head0[k] for k in ("weight", "bias"))
        self.opt = torch.optim.Adam(self.phi, lr=s.meta_lr)
        if s.solver in ("neumann", "identity"):
            solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=s.M if s.solver == "neumann" else 0, alpha=s.alpha)
        else:
            solve = torchopt.linear_solve.solve_cg(maxiter=s.cg_iters, rtol=0.0, atol=0.0, ridge=s.damping or None)
        p, keys = self.p, self.keys

        def pt_objective(theta, phi):
            return p.pt_loss(dict(zip(keys, theta)), {"task_logits": phi[0]})

        optimality = torch.func.grad(pt_objective, argnums=0)  # F(θ, φ) = ∇θ L_PT(θ, φ)

        @custom_root(optimality, argnums=1, solve=solve)
        def inner_solution(theta_init, phi):
            # θ* is the current pre-training iterate: the paper evaluates the implicit gradient at
            # the PT iterate instead of solving pre-training to convergence at every meta-step.
            return theta_init

        self.inner_solution = inner_solution

    def step(self):
        torchopt, p, s = self.torchopt, self.p, self.s
        theta = dict(zip(self.keys, self.inner_solution(tuple(v.detach() for v in self.theta), self.phi)))
        head = tuple(v.detach().requires_grad_(True) for v in self.head)
        opt = torchopt.sgd(s.ft_lr)
        state = opt.init(head)
        for _ in range(s.K):
            loss = p.ft_loss(theta, {"weight": head[0], "bias": head[1]}, p.ft_batch)
            grads = torch.autograd.grad(loss, head, create_graph=True)
            updates, state = opt.update(grads, state, inplace=False)
            head = torchopt.apply_updates(head, updates, inplace=False)
        lv = p.ft_loss(theta, {"weight": head[0], "bias": head[1]}, p.val_batch)
        self.opt.zero_grad(set_to_none=True)
        lv.backward(inputs=list(self.phi))
        self.opt.step()
        self.head = tuple(v.detach() for v in head)
        return {"task_logits": self.phi[0].grad.detach().clone()}

    def cycle(self):
        self.pt_opt.zero_grad(set_to_none=True)
        self.p.pt_loss(dict(zip(self.keys, self.theta)), {"task_logits": self.phi[0].detach()}).backward()
        self.pt_opt.step()
        return self.step()


class Betty:
    """Betty: ImplicitProblem "pt" (θ; hypergradient type neumann/cg) under ImplicitProblem "meta" (φ).

    ``cycle()`` is ``Engine.train_step()``: the PT problem's ``step`` (one Adam step on θ) which,
    after its ``unroll_steps = 1``, calls the meta problem's ``step_normal`` (one meta-step).
    """

    def __init__(self, s: Setting):
        from betty.configs import Config, EngineConfig
        from betty.engine import Engine
        from betty.problems import ImplicitProblem

        self.s, p = s, Problem(s)
        grabbed, kept = {}, {"head": {k: v.clone() for k, v in p.head0.items()}}

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.enc, self.pt = p.encoder, p.pt_head

            def forward(self, graphs):
                return self.pt(self.enc(graphs))

        class Phi(nn.Module):
            def __init__(self):
                super().__init__()
                self.task_logits = nn.Parameter(p.phi0["task_logits"].clone())

        class PT(ImplicitProblem):
            def training_step(self, batch):
                graphs, y = batch
                loss = pt_loss_from_logits(self.module(graphs), y, self.meta.module.task_logits)
                if s.damping:  # Betty's CG has no damping option: λ/2‖θ‖² adds λI to H, 0 to ∂²L/∂φ∂θ
                    loss = loss + 0.5 * s.damping * sum((q * q).sum() for q in self.module.parameters())
                return loss

        class Meta(ImplicitProblem):
            def training_step(self, batch):
                (ft_g, ft_y), (val_g, val_y) = batch
                enc = self.pt.module.enc
                w, b = (kept["head"][k].detach().requires_grad_(True) for k in ("weight", "bias"))
                for _ in range(s.K):  # differentiable head-only SGD (Betty has no unroll helper)
                    loss = F.binary_cross_entropy_with_logits(enc(ft_g) @ w + b, ft_y)
                    gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
                    w, b = w - s.ft_lr * gw, b - s.ft_lr * gb
                kept["head"] = {"weight": w.detach(), "bias": b.detach()}
                return F.binary_cross_entropy_with_logits(enc(val_g) @ w + b, val_y)

            def grad_callback(self):
                grabbed["task_logits"] = self.module.task_logits.grad.detach().clone()

        kind = {"type": s.solver, "neumann_iterations": s.M, "neumann_alpha": s.alpha,
                "cg_iterations": s.cg_iters, "cg_alpha": 1.0}
        pt_cfg = Config(**kind)
        if s.solver == "identity":  # Betty's "darts": central finite difference of ∇φ L_PT along g, H⁻¹ ≈ I
            assert s.alpha == 1.0, "Betty's darts has no α: H⁻¹ ≈ I"
            pt_cfg = Config(type="darts")
        meta_cfg = Config(type=pt_cfg.type, retain_graph=True)
        net = Net()
        self.pt = PT("pt", pt_cfg, net, torch.optim.Adam(net.parameters(), lr=s.pt_lr),
                     train_data_loader=_Loader(p.pt_batch))
        phi_mod = Phi()
        self.meta = Meta("meta", meta_cfg, phi_mod, torch.optim.Adam(phi_mod.parameters(), lr=s.meta_lr),
                         train_data_loader=_Loader((p.ft_batch, p.val_batch)))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            self.engine = Engine(
                problems=[self.pt, self.meta], config=EngineConfig(train_iters=1, strategy="cpu"),
                dependencies={"u2l": {self.meta: [self.pt]}, "l2u": {self.pt: [self.meta]}},
            )
        self.pt.cur_batch = p.pt_batch  # the batch of the PT step just taken, as Engine leaves it
        self.grabbed = grabbed

    def step(self):
        self.meta.one_step_descent()
        return {"task_logits": self.grabbed["task_logits"]}

    def cycle(self):
        self.grabbed.clear()
        self.engine.train_step()
        return {"task_logits": self.grabbed["task_logits"]}  # KeyError if Engine skipped the meta-step


class _Loader:
    """An endless 'data loader' yielding one fixed batch (Betty iterates it)."""

    def __init__(self, item):
        self.item = item

    def __iter__(self):
        return itertools.repeat(self.item)


CG_DAMPING = 3.0  # smallest of {0.1, 0.3, 1, 3, 10} with positive curvature over 10 CG steps here

METHODS = {"metapt": MetaptTrainer, "metapt-fn": MetaptFn, "metapt-fwdrev": MetaptFwdRev, "betty": Betty,
           "torchopt": TorchOpt,
           "metapt-noreuse": lambda s: MetaptTrainer(s, reuse_pt_graph=False)}
# methods of the cycle rows (one PT step, then one meta-step); the reference is "metapt" (with reuse)
CYCLE_METHODS = ("metapt", "metapt-noreuse", "betty", "torchopt")

# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _flat(h):
    return torch.cat([v.reshape(-1).double() for v in h.values()])


def agreement(ref, other):
    a, b = _flat(ref), _flat(other)
    cos = float(a @ b / (a.norm() * b.norm()))
    return {"cosine": cos, "rel_l2": float((b - a).norm() / a.norm())}


def _call(runner, kind: str):
    """The timed unit: ``step`` (one meta-step) or ``cycle`` (one PT step, then one meta-step)."""
    return getattr(runner, kind)()


def time_methods(s: Setting, methods, reps: int, kind: str = "step"):
    runners = {m: METHODS[m](s) for m in methods}
    first = {m: _call(r, kind) for m, r in runners.items()}  # warm-up; also the agreement sample
    times = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for i in range(reps):  # interleaved, rotating the order, so drift and cache effects hit all alike
        order = methods[i % len(methods):] + methods[: i % len(methods)]
        for m in order:
            t0, c0 = time.perf_counter(), time.process_time()
            _call(runners[m], kind)
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    pt = []
    trainer = runners.get("metapt")
    if trainer is not None and kind == "step":  # a plain PT step, for scale
        for _ in range(reps):
            t0 = time.perf_counter()
            trainer.pt_step()
            pt.append(time.perf_counter() - t0)
    med = {m: (statistics.median(times[m]), statistics.median(cpu[m])) for m in methods}
    return first, med, (statistics.median(pt) if pt else None)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(method: str, s: Setting, kind: str = "step", repeats: int = 3):
    """In this (fresh) process: extra peak RSS of one ``kind`` of ``method``, median of ``repeats``."""
    torch.set_num_threads(1)
    r = METHODS[method](s)
    _call(r, kind)
    _call(r, kind)
    peaks = []
    for _ in range(repeats):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        _call(r, kind)
        peaks.append((_status_kb("VmHWM") - base) * 1024)
    return {"peak_bytes": statistics.median(peaks), "rss_bytes": base * 1024, "hwm_total_bytes": _status_kb("VmHWM") * 1024}


def peak_memory(method: str, s: Setting, kind: str = "step"):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--kind", kind,
           "--setting", json.dumps(asdict(s))]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"{method} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def hessian_scale(s: Setting) -> float:
    """‖H g‖/‖g‖ with g = dL_V/dθ at the benchmark state: how large α must be for αH to show."""
    p = Problem(replace(s, dtype="float64"))
    theta = {k: v.requires_grad_(True) for k, v in p.theta0().items()}
    head = unrolled_finetune(lambda h, k: p.ft_loss(theta, h, p.ft_batch), p.head0, sgd(s.ft_lr), s.K)
    tl = list(theta.values())
    g = torch.autograd.grad(p.ft_loss(theta, head, p.val_batch), tl, allow_unused=True)
    g = [torch.zeros_like(t) if x is None else x for x, t in zip(g, tl)]
    gp = torch.autograd.grad(p.pt_loss(theta, p.phi0), list(theta.values()), create_graph=True)
    hg = torch.autograd.grad(gp, list(theta.values()), grad_outputs=g)
    n = lambda xs: math.sqrt(sum(float((x * x).sum()) for x in xs))
    return n(hg) / n(g)


# ---------------------------------------------------------------------------------------------
# Profile of metapt's meta-step: the same sequence as pretraining_hypergradient, phase by phase
# ---------------------------------------------------------------------------------------------


def profile_metapt(s: Setting, reps: int):
    p = Problem(s)
    theta = {k: v.requires_grad_(True) for k, v in p.theta0().items()}
    phi = {k: v.clone().requires_grad_(True) for k, v in p.phi0.items()}
    tl, pl = list(theta.values()), list(phi.values())
    ph = {k: [] for k in ("ft_forward_unroll", "val_forward", "backward_g", "pt_forward",
                          "pt_grad_create_graph", "hvp_each", "mixed", "plain_pt_step")}
    opt = torch.optim.Adam(tl, lr=s.pt_lr)
    for i in range(reps + 1):
        c = time.process_time  # CPU time: the machine is shared, wall time is not this process's alone
        t0 = c()
        head = unrolled_finetune(lambda h, k: p.ft_loss(theta, h, p.ft_batch), p.head0, sgd(s.ft_lr), s.K)
        t1 = c()
        lv = p.ft_loss(theta, head, p.val_batch)
        t2 = c()
        g = torch.autograd.grad(lv, tl, allow_unused=True)
        g = [torch.zeros_like(t) if x is None else x for x, t in zip(g, tl)]
        t3 = c()
        lpt = p.pt_loss(theta, phi)
        t4 = c()
        gp = torch.autograd.grad(lpt, tl, create_graph=True)
        t5 = c()
        v = g
        for _ in range(max(s.M, 1)):
            hv = torch.autograd.grad(gp, tl, grad_outputs=v, retain_graph=True)
            v = [a - s.alpha * b for a, b in zip(v, hv)]
        t6 = c()
        torch.autograd.grad(gp, pl, grad_outputs=v)
        t7 = c()
        opt.zero_grad()
        p.pt_loss(theta, {k: x.detach() for k, x in phi.items()}).backward()
        opt.step()
        t8 = c()
        if i:
            for k, dt in zip(ph, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, (t6 - t5) / max(s.M, 1), t7 - t6, t8 - t7)):
                ph[k].append(dt)
    return {k: statistics.median(v) for k, v in ph.items()}


# ---------------------------------------------------------------------------------------------


def _versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("metapt", "betty-ml", "torchopt", "optree", "torch_geometric", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


_UNIT = {"step": "meta_step", "cycle": "cycle"}  # the rows' time keys: meta_step_s or cycle_s


def run_setting(s: Setting, methods, reps, memory, kind: str = "step"):
    """Rows of one setting, ratios to ``metapt`` (for cycles: ``MetaPretrainer`` with reuse)."""
    first, med, pt = time_methods(s, methods, reps, kind)
    ref_t, ref_c = med["metapt"]
    rows, unit = [], _UNIT[kind]
    mem = {m: peak_memory(m, s, kind) for m in methods} if memory else {}
    for m in methods:
        row = {"setting": s.name, "method": m, f"{unit}_s": round(med[m][0], 5),
               "time_vs_metapt": round(med[m][0] / ref_t, 3), f"{unit}_cpu_s": round(med[m][1], 5),
               "cpu_vs_metapt": round(med[m][1] / ref_c, 3), **{k: round(v, 8) for k, v in agreement(first["metapt"], first[m]).items()}}
        if memory:
            row["peak_mb"] = round(mem[m]["peak_bytes"] / 2**20, 1)
            row["memory_vs_metapt"] = round(mem[m]["peak_bytes"] / max(mem["metapt"]["peak_bytes"], 1), 3)
            row["process_hwm_mb"] = round(mem[m]["hwm_total_bytes"] / 2**20, 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows, pt


def agreement_only(s: Setting, methods, control: Setting | None = None):
    """Each method against metapt; ``control``: metapt with a different solver, to show the check can tell."""
    ref = None
    rows = []
    for m in methods:
        h = METHODS[m](s).step()
        ref = h if ref is None else ref
        rows.append({"setting": s.name, "method": m, **{k: round(v, 12) for k, v in agreement(ref, h).items()}})
    if control is not None:
        h = MetaptFn(control).step()
        rows.append({"setting": s.name, "method": f"control: metapt with {control.name.split(', ', 2)[2]}",
                     **{k: round(v, 12) for k, v in agreement(ref, h).items()}})
    for row in rows:
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


PEERS = ("betty", "torchopt")


def _verdict(rows, unit: str) -> list[str]:
    """One line per setting and peer: is metapt 1.5x as fast (CPU time) with no more peak memory?"""
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        by = {r["method"]: r for r in rows if r["setting"] == setting}
        for peer in PEERS:
            if peer not in by:
                continue
            r = by[peer]
            speed = r["cpu_vs_metapt"]  # peer time / metapt time: how many times faster metapt is
            mem = r.get("memory_vs_metapt")
            ok = speed >= 1.5 and (mem is None or mem >= 1.0)
            out.append(f"- {unit}, {setting}, {peer}: {peer} takes {speed:.2f}x metapt's CPU time "
                       f"(wall {r['time_vs_metapt']:.2f}x), so metapt is {speed:.2f}x as fast"
                       + (f"; {peer}'s peak memory is {mem:.2f}x metapt's" if mem is not None else "")
                       + f": goal {'met' if ok else '**not met**'}.")
    return out


def _table(rows, unit: str) -> list[str]:
    lines = ["| setting | method | wall (s) | wall / metapt | CPU (s) | CPU / metapt | peak (MB) | memory / metapt | cosine | rel. L2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['method']} | {r[unit + '_s']:.4f} | {r['time_vs_metapt']:.2f} | "
            f"{r[unit + '_cpu_s']:.4f} | {r['cpu_vs_metapt']:.2f} | "
            f"{r.get('peak_mb', float('nan')):.1f} | {r.get('memory_vs_metapt', float('nan')):.2f} | "
            f"{r['cosine']:.6f} | {r['rel_l2']:.1e} |"
        )
    return lines


GOAL = ("The goal (issue 7): metapt at least 1.5x as fast as each peer (peer CPU time / metapt CPU time "
        "≥ 1.5) with no more peak memory (peer peak / metapt peak ≥ 1). The verdicts below are computed from "
        "this run's table; benchmarks/peers_notes.md explains what each peer computes.")


def markdown(result) -> str:
    v = result["versions"]
    lines = [
        "# metapt vs Betty vs TorchOpt: one meta-step, and one PT step + meta-step, of the paper's problem",
        "",
        (f"Produced by `OMP_NUM_THREADS=1 benchmarks/.peers-venv/bin/{result['command']}` (= `make bench-peers`; issue 7, "
         f"\"side by side with peers\"), {result['machine']['threads']} thread, {result['machine']['platform']}."),
        (f"Versions: python {v['python']}, torch {v['torch']}, metapt {v['metapt']}, betty-ml {v['betty-ml']}, "
         f"torchopt {v['torchopt']} (optree {v['optree']}), torch_geometric {v['torch_geometric']}. "
         "Peers live in their own venv (see the docstring of `benchmarks/peers.py`); betty-ml 0.2.1 "
         "declares Python < 3.11 and was installed with `--no-deps --ignore-requires-python`; "
         "torchopt's compiled `_C` extension does not load against torch 2.13 (undefined symbol), "
         "which only affects its fused Adam, not used here."),
        "",
        "## One meta-step alone",
        "",
        ("Time: median per meta-step over interleaved repetitions (15 for the 3x64 GIN, 5 for 5x300) "
         "after one warm-up step each, wall and CPU; peak: extra RSS high-water mark of one meta-step "
         "(median of 3) in a fresh process per method. Ratios are to `metapt` "
         "(`MetaPretrainer.meta_step` with no PT step before it, so it cannot reuse a PT graph): above 1 "
         "means the method is slower / uses more than metapt. "
         "Cosine / rel. L2: the method's hypergradient against metapt's, from the same state."),
        "",
        *_table(result["rows"], "meta_step"),
    ]
    if result.get("cycle_rows"):
        lines += ["", "## One cycle: a PT step, then a meta-step", "",
                  ("What Algorithm 1 runs every `interval` PT steps, timed and measured as above "
                   "(per cycle; peak: one cycle in a fresh process). `metapt`: `MetaPretrainer.pretrain_step()` "
                   "then `meta_step()` with `reuse_pt_graph=True` (opt-in: the PT step keeps its gradient "
                   "graph and the meta-step takes H and the mixed term from it), the reference of the ratios; "
                   "`metapt-noreuse`: the same with `reuse_pt_graph=False`; `betty`: `Engine.train_step()` "
                   "(the PT problem's Adam step, which then runs the meta problem's step); `torchopt`: a "
                   "`torchopt.Adam` step on θ, then the `custom_root` hypergradient and Adam on φ. Cosine / "
                   "rel. L2: the first cycle's hypergradient against `metapt`'s. With reuse, H and the mixed "
                   "term are taken at θ before the PT update and g at θ after it; everyone else takes all three "
                   "after it, so the difference is the effect of one Adam step (lr 1e-3) on H, not an error."),
                  "", *_table(result["cycle_rows"], "cycle")]
    lines += ["", "## Against the issue's goal (metapt at least 1.5x faster, no more memory)", "",
              GOAL, "", *_verdict(result["rows"], "meta-step alone")]
    if result.get("cycle_rows"):
        lines += _verdict(result["cycle_rows"], "cycle")
    lines += ["", "Plain PT step of the same model and batch, wall time (for scale; its CPU time is in the "
              "profile below): " + ", ".join(f"{k}: {v:.4f} s" for k, v in result["pt_step_s"].items()), ""]
    lines += ["## Agreement (float64)", "", "| setting | method | cosine | rel. L2 |", "|---|---|---|---|"]
    for r in result["agreement"]:
        lines.append(f"| {r['setting']} | {r['method']} | {r['cosine']:.12f} | {r['rel_l2']:.2e} |")
    if result.get("profile"):
        keys = list(next(iter(result["profile"].values())))
        lines += ["", "## Where metapt's meta-step goes", "",
                  ("CPU time of each phase of the sequence `pretraining_hypergradient` runs, timed one by one "
                   "(median); `hvp_each` is one HVP; `plain_pt_step` is a PT forward, backward and Adam step."), "",
                  "| setting | " + " | ".join(keys) + " | sum of meta phases |",
                  "|---|" + "---|" * (len(keys) + 1)]
        for name, ph in result["profile"].items():
            total = sum(x for k, x in ph.items() if k != "plain_pt_step")
            lines.append(f"| {name} | " + " | ".join(f"{x * 1e3:.1f} ms" for x in ph.values())
                         + f" | {total * 1e3:.0f} ms = {total / ph['plain_pt_step']:.1f} PT steps |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15, help="timed meta-steps per method, small GIN")
    ap.add_argument("--big-reps", type=int, default=5, help="timed meta-steps per method, hu2020 GIN")
    ap.add_argument("--models", default="small,hu2020", help="small (3x64) and/or hu2020 (5x300)")
    ap.add_argument("--methods", default="metapt,metapt-fn,metapt-fwdrev,betty,torchopt")
    ap.add_argument("--cycle-methods", default=",".join(CYCLE_METHODS),
                    help="methods of the cycle rows (PT step + meta-step); empty: no cycle rows")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--md")
    ap.add_argument("--child")
    ap.add_argument("--kind", default="step", choices=("step", "cycle"), help="with --child")
    ap.add_argument("--setting")
    ap.add_argument("--render", help="only write --md from this results JSON (no measurement)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.render:
        with open(args.render) as f, open(args.md, "w") as out:
            out.write(markdown(json.load(f)))
        return
    if args.child:
        print(json.dumps(child(args.child, Setting(**json.loads(args.setting)), args.kind)))
        return
    methods = args.methods.split(",")
    cycle_methods = [m for m in args.cycle_methods.split(",") if m]
    sizes = {"small": (3, 64), "hu2020": (5, 300)}
    timed = []
    for name in args.models.split(","):
        layers, emb = sizes[name]
        timed.append(Setting(layers=layers, emb=emb))
        if name == "small":
            timed.append(Setting(layers=layers, emb=emb, solver="cg", cg_iters=5, damping=CG_DAMPING))
    rows, cycle_rows, pts, profile = [], [], {}, {}
    for s in timed:
        reps = args.reps if s.emb < 300 else args.big_reps
        r, pt = run_setting(s, methods, reps, not args.no_memory)
        rows += r
        pts[s.name] = pt
        if cycle_methods:
            cycle_rows += run_setting(s, cycle_methods, reps, not args.no_memory, kind="cycle")[0]
        if s.solver == "neumann" and not args.no_profile:
            profile[s.name] = profile_metapt(s, reps)
    # float64 agreement where αH is not negligible: α = 0.5 / (‖Hg‖/‖g‖), M = 5; and CG
    small = Setting(dtype="float64")
    scale = hessian_scale(small)
    stress = [replace(small, M=5, alpha=round(0.5 / scale, 6)),
              replace(small, solver="cg", cg_iters=1, damping=CG_DAMPING),
              replace(small, solver="cg", cg_iters=5, damping=CG_DAMPING)]
    controls = [replace(stress[0], M=0), replace(stress[1], cg_iters=5), replace(stress[2], cg_iters=1)]
    agree = []
    for s, c in zip(stress, controls):
        agree += agreement_only(s, methods, c)
    agree += agreement_only(replace(small, solver="identity", alpha=1.0), methods)
    result = {
        "command": "python " + " ".join(sys.argv),
        "commit": source_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "versions": _versions(),
        "settings": [asdict(s) for s in timed],
        "rows": rows,
        "cycle_rows": cycle_rows,
        "pt_step_s": pts,
        "hessian_scale_float64_small": scale,
        "agreement": agree,
        "profile": profile,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(result))


if __name__ == "__main__":
    main()
