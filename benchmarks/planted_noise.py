"""Planted label noise: do meta-learned example weights find the corrupted pre-training molecules?

A known share (default 20 %) of the ChEMBL pre-training molecules get every observed label
flipped (y → 1 − y); ``--min-labels K`` draws the molecules from those with at least K observed
labels (most have one), so that a corrupted molecule contradicts the model on several targets: a
stronger, more detectable harm. Then:

* **loss ranking** (the baseline): pre-train with uniform weights and rank each molecule by its
  training loss averaged over the PT steps that drew it (a forward without dropout right after
  each step), AUROC of that loss against the corrupted flag;
* **learned weights**: pre-train on the corrupted data with meta-learned example weights
  (``MoleculesProblem``, ``WeightingConfig(example_weights=True)``), AUROC of −weight against the
  corrupted flag, over all pre-training molecules and over those some meta-step drew;
* **learned weight network** (``--family weight_net``): the same, with the weights from one shared
  network of each molecule's current PT loss and share of observed labels
  (``WeightingConfig(example_weight_net=True)``, :class:`metapt.metaparams.ExampleWeightNet`,
  Meta-Weight-Net), so every meta-step moves every molecule's weight; AUROC of −(the net's weight of
  each pre-training molecule at the end of the run, from a no-dropout forward over all of them, the
  features standardised over all of them), beside the AUROC of that forward's loss itself (the
  net's input: what a net monotone in the loss would reach);
* **out-of-fold loss ranking** (``--detectability FOLDS``, a premise of the AUROC bar): each
  molecule's loss under a uniform model pre-trained on the other folds only, so no model scores a
  molecule it memorised; how detectable the planted noise is from these data by loss at all;
* **alignment probe** (a diagnostic of the signal the hypergradient works with): at the end of the
  corrupted uniform run, each molecule's PT-loss gradient ∇θℓ_i dotted with the gradient of the
  clean held-out ChEMBL loss (all of it, no dropout); the one-step hypergradient of an example
  weight is −α times this, so AUROC(−alignment) is what a noiseless first-order estimate could rank;
* **downstream**: B3DB test AUROC of a linear probe (logistic regression on the frozen encoder's
  embedding, C picked on B3DB valid) for the clean uniform run, the corrupted uniform run and
  each learned-weights run on corrupted data (``--no-downstream`` skips it).

The meta-objective (``--targets``): ``b3db`` (the main job's: a head fine-tuned on B3DB);
``chembl``: a fresh head fine-tuned on the same 30 ChEMBL targets on held-out molecules with
clean labels (``--clean-val`` of them, disjoint from pre-training); ``chembl_pt``: the same clean
held-out molecules scored by the pre-trained model's own multitask head (plus a fine-tuned
correction ψ, zero at the start) — the data-reweighting setting of Ren et al. (2018), where the
validation loss is that of the model being trained. φ's
optimiser (``--optimizers``): ``lazy_sgd``/``lazy_adam`` (:mod:`metapt.optim`, only the rows a
meta-step touched) or ``adam`` (dense ``torch.optim.Adam``, what the trainer used before).

    OMP_NUM_THREADS=1 python benchmarks/planted_noise.py --out benchmarks/results/planted_noise.json

Prints JSON; ``--out`` also writes it and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from metapt import MetaPretrainer, MetaSchedule
from metapt.domains.molecules.models import GINEncoder, masked_bce
from metapt.domains.molecules.problem import MoleculesProblem, WeightingConfig, load_molecule_data
from metapt.hypergrad import (ConjugateGradient, Estimator, Neumann, adam_preconditioner, default_estimator,
                             hessian_vector_product, lanczos, pretrain_backward_with_mixed_term, sgd)
from metapt.metaparams import ExampleWeightNet, weights_from_logits
from metapt.optim import LazyAdam, LazySGD
from metapt.trainer import _buffers_kept, _mean
from _results import source_commit  # noqa: E402  (HEAD; refused if metapt comes from another tree)

OPTIMIZERS = {
    "lazy_sgd": lambda lr: (lambda ps: LazySGD(ps, lr=lr)),
    "lazy_adam": lambda lr: (lambda ps: LazyAdam(ps, lr=lr)),
    "adam": lambda lr: (lambda ps: torch.optim.Adam(ps, lr=lr)),
}


def planted_data(args, seed):
    """(b3db data with corrupted PT labels, the same with the clean-ChEMBL meta-objective, flags, clean data)."""
    wanted = args.pretrain + args.clean_val
    data = load_molecule_data("b3db", seed=seed, max_pretrain=None if args.min_labels > 1 else wanted,
                              max_downstream=args.downstream, cache_dir=args.cache)
    g = torch.Generator().manual_seed(1000 + seed)
    if args.min_labels > 1:  # the pool: molecules with at least that many observed labels (a stronger harm)
        pool = ((~torch.isnan(data.pretrain_labels)).sum(1) >= args.min_labels).nonzero().squeeze(1)
        if len(pool) < wanted:
            raise SystemExit(f"--min-labels {args.min_labels}: {len(pool)} molecules, fewer than "
                             f"--pretrain + --clean-val = {wanted}")
        order = pool[torch.randperm(len(pool), generator=g)[:wanted]]
    else:
        order = torch.randperm(len(data.pretrain_positions), generator=g)
    # the held-out molecules stay in random order: the store is ordered by target, so a cut of sorted
    # positions would give MetaFT-validation the last few targets only
    pt_idx, val_idx = order[: args.pretrain].sort().values, order[args.pretrain:]
    clean = dataclasses.replace(data, pretrain_positions=data.pretrain_positions[pt_idx],
                                pretrain_labels=data.pretrain_labels[pt_idx])
    n = len(pt_idx)
    flagged = torch.zeros(n, dtype=torch.bool)
    flagged[torch.randperm(n, generator=g)[: int(round(args.corrupt * n))]] = True
    y = clean.pretrain_labels
    corrupted_labels = torch.where(flagged[:, None] & ~torch.isnan(y), 1 - y, y)
    corrupted = dataclasses.replace(clean, pretrain_labels=corrupted_labels)
    # the clean-ChEMBL meta-objective: held-out molecules, the 30 PT targets, clean labels
    val_pos = data.pretrain_positions[val_idx]
    cut = int(0.8 * len(val_pos))
    chembl_target = dataclasses.replace(
        corrupted, downstream=data.pretrain, downstream_labels=data.pretrain.y,
        split={"ft_train": val_pos[:cut], "metaval": val_pos[cut:], "valid": val_pos[cut:], "test": val_pos[cut:]},
    )
    return {"b3db": corrupted, "chembl": chembl_target, "chembl_pt": chembl_target}, flagged, clean


class PTHeadObjective(MoleculesProblem):
    """The FT model is the PT model's own multitask head plus a correction ψ (the FT head, zero at
    the start): L_V is the pre-trained model's loss on clean held-out molecules of the same tasks."""

    def finetune_loss(self, params, head, batch):
        z = self.embed(params, batch, train=False)
        logits = z @ (params["pt.weight"] + head["weight"]).T + params["pt.bias"] + head["bias"]
        return masked_bce(logits, batch.y)


def _encoder(args, seed):
    torch.manual_seed(seed)
    return GINEncoder(num_layers=args.layers, emb_dim=args.emb_dim, dropout=0.2, norm="layer")


def pretrain(args, data, seed, *, meta=None, pt_head_objective=False, probe=None):
    """θ after ``args.steps`` PT steps; with ``meta=(optimizer, lr)`` also learned example weights
    (``args.family``: one logit per molecule, or the weight network), else uniform weights and each
    molecule's mean training loss. ``probe(problem, params, trainer)`` is called after each step in
    ``args.probe_steps`` (its results under ``out["probes"]``)."""
    net = meta is not None and args.family == "weight_net"
    weighting = (WeightingConfig(task_weights=False, example_weight_net=True, normalize=args.normalize) if net else
                 WeightingConfig(task_weights=False, example_weights=True, normalize=args.normalize))
    kind = PTHeadObjective if pt_head_objective else MoleculesProblem
    problem = kind(data, _encoder(args, seed), weighting, pt_batch_size=args.batch, ft_batch_size=args.val_batch or args.batch,
                   seed=seed)
    torch.manual_seed(seed + 1)
    opt, lr = meta if meta is not None else ("adam", 0.0)
    trainer = MetaPretrainer(
        problem, problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=args.pt_lr),
        meta_optimizer=OPTIMIZERS[opt](lr if lr > 0 else 1e-3),
        inner_optimizer=sgd(args.inner_lr),
        estimator={"paper": Estimator(solver=Neumann(steps=1, alpha=args.pt_lr)),
                   "accumulated": Estimator(accumulate=1, adam_preconditioner=True,
                                            direction_decay=args.direction_decay)}.get(
                       args.estimator, default_estimator(args.pt_lr)),
        schedule=MetaSchedule(interval=args.interval, warmup_steps=args.warmup, learn_phi=meta is not None,
                              average=args.average, head_start=args.head_start),
    )
    n = len(data.pretrain_positions)
    loss_sum, loss_count, drawn = torch.zeros(n, dtype=torch.float64), torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    probes = {}
    for step in range(args.steps):
        trainer.run_until(step + 1)
        if probe is not None and step + 1 in args.probe_steps:
            probes[step + 1] = probe(problem, {k: v.detach() for k, v in trainer.params.items()}, trainer)
        if meta is None:  # per-molecule loss of the batch just used, without dropout
            graphs, rows = problem.pretrain_batch(step)
            with torch.no_grad():
                theta = {k: v.detach() for k, v in trainer.params.items()}
                logits = problem.embed(theta, graphs, train=False) @ theta["pt.weight"].T + theta["pt.bias"]
                y = graphs.y
                obs = ~torch.isnan(y)
                bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.where(obs, y, 0.0), reduction="none")
                per = (bce * obs).sum(1) / obs.sum(1).clamp(min=1)
            loss_sum.index_add_(0, rows, per.double())
            loss_count.index_add_(0, rows, torch.ones(len(rows)))
        elif args.estimator == "accumulated" and trainer._direction is not None:
            drawn[problem.pretrain_batch(step)[1]] = True  # every PT batch after the first meta-step draws
        elif trainer.meta_step_due(step + 1):
            # the meta-step's PT batch: the one just taken (paper) or the next one (default estimator)
            drawn[problem.pretrain_batch(step + (args.estimator == "default"))[1]] = True
    out = {"params": {k: v.detach() for k, v in trainer.params.items()}, "encoder": problem, "skipped": trainer.skipped,
           "probes": probes}
    if meta is None:
        out["mean_loss"] = (loss_sum / loss_count.clamp(min=1)).numpy()
    elif net:
        out["weights"], out["final_loss"] = net_weights(problem, out["params"], trainer.averaged_metaparams)
        out["summary"] = next(f for f in problem.families if isinstance(f, ExampleWeightNet)).summary(
            trainer.averaged_metaparams)
        out["drawn"] = drawn.numpy()
    else:
        out["weights"] = weights_from_logits(trainer.averaged_metaparams["example_logits"]).numpy()
        out["drawn"] = drawn.numpy()
    return out


def out_of_fold_loss(args, data, seed, folds):
    """Every PT molecule's loss (its observed, possibly flipped labels; no dropout) under a uniform
    model pre-trained, with the same steps, on the other folds only: a detector that cannot have
    memorised the molecule it scores (confident learning's out-of-sample loss). What a loss-based
    rule reaches without memorisation, so a premise of the AUROC bar: is the planted noise this
    detectable in these data at all?"""
    n = len(data.pretrain_positions)
    fold = torch.randperm(n, generator=torch.Generator().manual_seed(2000 + seed)) % folds

    def rows(mask):
        idx = mask.nonzero().squeeze(1)
        return dataclasses.replace(data, pretrain_positions=data.pretrain_positions[idx],
                                   pretrain_labels=data.pretrain_labels[idx])

    loss = np.full(n, np.nan)
    for f in range(folds):
        params = pretrain(args, rows(fold != f), seed)["params"]
        scorer = MoleculesProblem(rows(fold == f), _encoder(args, seed),  # only the held-out fold is scored
                                  WeightingConfig(task_weights=False, example_weights=True),
                                  pt_batch_size=args.batch, ft_batch_size=args.batch, seed=seed)
        loss[(fold == f).numpy()] = current_losses(scorer, params)
    return loss


def net_weights(problem, params, phi, chunk=512):
    """(every PT molecule's weight from the learned network, its PT loss): the features from one
    forward without dropout at the final θ, standardised over all PT molecules (not per batch)."""
    net = next(f for f in problem.families if isinstance(f, ExampleWeightNet))
    features = all_features(problem, params, chunk)
    with torch.no_grad():
        w = net.weights({k: v.detach() for k, v in phi.items()}, features)
    return w.numpy(), features[:, 0].numpy()


def _pt_head_loss(problem, theta, graphs):
    """The PT model's own multitask loss on ``graphs`` (no dropout), differentiable in ``theta``."""
    z = problem.embed(theta, graphs, train=False)
    return masked_bce(z @ theta["pt.weight"].T + theta["pt.bias"], graphs.y)


def _clean_gradient(problem, theta, chembl):
    """∇θ L_clean: the PT-head loss on all clean held-out molecules (zeros where it does not reach)."""
    val = chembl.downstream_batch(torch.cat([chembl.split["ft_train"], chembl.split["metaval"]]))
    keys = list(theta)
    g = torch.autograd.grad(_pt_head_loss(problem, theta, val), [theta[k] for k in keys], allow_unused=True)
    return {k: torch.zeros_like(theta[k]) if b is None else b.detach() for k, b in zip(keys, g)}


def _per_molecule_dots(problem, theta, directions):
    """{name: [n] ⟨∇θ ℓ_i, d⟩} for each direction d, one backward per PT molecule."""
    keys = list(theta)
    n = len(problem.data.pretrain_positions)
    out = {name: np.zeros(n) for name in directions}
    for i in range(n):
        gi = torch.autograd.grad(_pt_head_loss(problem, theta, problem.data.pretrain_batch(torch.tensor([i]))),
                                 [theta[k] for k in keys], allow_unused=True)
        for name, d in directions.items():
            out[name][i] = sum(float((a * d[k]).sum()) for a, k in zip(gi, keys) if a is not None)
    return out


def alignment_probe(problem, params, chembl, precond=None, *, clean_gradient=None):
    """Per PT molecule ⟨∇θ ℓ_i, ∇θ L_clean⟩, L_clean the PT model's loss on the clean held-out molecules;
    with ``precond`` (Adam's P = 1/(√v̂ + ε) per entry of θ) also ⟨P ⊙ ∇θ ℓ_i, ∇θ L_clean⟩, the
    one-step derivative when the step on ℓ_i is Adam's, as the accumulated estimator models it."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    g = _clean_gradient(problem, theta, chembl)
    if clean_gradient is not None:  # the probe's v, for a draw against it
        clean_gradient.update(g)
    directions = {"plain": g}
    if precond is not None:
        directions["adam"] = {k: precond[k] * b for k, b in g.items()}
    dots = _per_molecule_dots(problem, theta, directions)
    return dots["plain"] if precond is None else (dots["plain"], dots["adam"])


def influence_probe(problem, params, chembl, dampings, *, cg_steps=50, lanczos_steps=20):
    """What implicit differentiation knows per molecule: −⟨∇θ ℓ_i, (H + λI)⁻¹ ∇θ L_clean⟩ at the end of
    the uniform run, H the Hessian of the PT loss over all PT molecules (the model's own head, no
    dropout), L_clean as in :func:`alignment_probe`. Upweighting molecule i changes the clean loss
    at the pre-training optimum by −∇L_cleanᵀ H⁻¹ ∇ℓ_i (the implicit-function theorem; Koh & Liang's
    influence), so these are the IFT hypergradient's per-molecule scores where the alignment probe
    is its one-step (H⁻¹ ≈ αI) version. λ = fraction × λmax (Lanczos) plus 2·max(0, −λmin), per
    entry of ``dampings``; CG with ``cg_steps`` products. Returns {fraction: scores} and the solves."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    everything = problem.data.pretrain_batch(torch.arange(len(problem.data.pretrain_positions)))
    hvp = hessian_vector_product(lambda t: _pt_head_loss(problem, t, everything), theta)
    spectrum = lanczos(hvp, theta, lanczos_steps)
    g = _clean_gradient(problem, theta, chembl)
    directions, solves = {}, {}
    for frac in dampings:
        damping = frac * spectrum.lambda_max + 2.0 * max(0.0, -spectrum.lambda_min)
        directions[frac], info = ConjugateGradient(max_iter=cg_steps, tol=1e-8, damping=damping)(hvp, g)
        solves[str(frac)] = {"damping": round(damping, 6), "iterations": info.iterations,
                             "relative_residual": round(info.relative_residual, 6),
                             "negative_curvature": info.negative_curvature, "diverged": info.diverged}
    scores = {frac: -dots for frac, dots in _per_molecule_dots(problem, theta, directions).items()}
    spectrum_info = {"lambda_max": round(spectrum.lambda_max, 6), "lambda_min": round(spectrum.lambda_min, 6)}
    return scores, {"spectrum": spectrum_info, "solves": solves}


def sign_check(problem, trainer, chembl, flags, batches):
    """Does the run's meta-objective agree with the alignment probe, molecule by molecule? The
    exact one-step derivative dL_meta/dφ_i of the meta-step's own objective (fine-tuning
    lookahead, the run's Adam state, dropout as in training; :meth:`StateProbe.exact_derivative`)
    on ``batches`` upcoming PT batches, against −⟨P ⊙ ∇θ ℓ_i, ∇θ L_clean⟩ at the same θ. A
    corrupted molecule's weight should have a positive derivative (raising it raises the loss)."""
    from scipy.stats import spearmanr

    from metapt.diagnostics import StateProbe

    state = StateProbe(trainer)
    n = len(problem.data.pretrain_positions)
    total, seen = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
    # the accumulated estimator's own draw at the same state and batch (its math, without the
    # in-run staleness of the validation direction it is taken against)
    drawn = torch.zeros(n, dtype=torch.float64)
    accumulated = Estimator(accumulate=1, adam_preconditioner=True)
    # the run's own draw: the forward difference fused with the PT step's backward, against the
    # fresh direction and against the one the run holds (the last meta-step's, up to an interval old)
    params = {k: v.detach() for k, v in trainer.params.items()}
    probe_v = {}
    _, adam = alignment_probe(problem, params, chembl, adam_preconditioner(trainer.pt_opt, trainer.params),
                              clean_gradient=probe_v)
    centred, batches_of = np.zeros(n), np.zeros(n)

    # and against v averaged over 16 validation batches at this θ: how much of a draw is v's batch noise
    def averaged_direction(head=None, unroll=None):
        kept = state.head, state.schedule
        if head is not None:
            state.head = head
        if unroll is not None:
            state.schedule = dataclasses.replace(state.schedule, unroll_steps=unroll)
        try:
            directions = [state.estimate(accumulated, sample=s)[1].direction for s in range(16)]
        finally:
            state.head, state.schedule = kept
        return _mean(directions)

    averaged = averaged_direction()
    # the parts of the fine-tuning lookahead: the head correction ψ the run carries (fitted to the
    # clean molecules over the run), and the unrolled step
    zero_head = {k: torch.zeros_like(v) for k, v in state.head.items()}
    lookahead_parts = {"carried_no_unroll": averaged_direction(unroll=0),
                       "zero_head": averaged_direction(head=zero_head),
                       "zero_head_no_unroll": averaged_direction(head=zero_head, unroll=0)}
    fused = {name: torch.zeros(n, dtype=torch.float64)
             for name in ("fresh", "stale", "averaged", "averaged_eval", "probe_v", "probe_v_eval", *lookahead_parts)}
    start = state.step
    for b in range(batches):
        state.step = start + b  # the b-th upcoming PT batch is the one its one step reads
        batch = problem.pretrain_batch(state.step)
        rows = batch[1]
        d = state.exact_derivative(1)["example_logits"].double()
        total[rows] += d[rows]
        hyper, info, _ = state.estimate(accumulated)
        drawn[rows] += hyper["example_logits"].double()[rows]
        for name, v, train in (("fresh", info.direction, True), ("stale", trainer._direction, True),
                               ("averaged", averaged, True), ("averaged_eval", averaged, False),
                               ("probe_v", probe_v, True), ("probe_v_eval", probe_v, False),
                               *((name, v, True) for name, v in lookahead_parts.items())):
            alpha, u = trainer._draw_scale(v)  # α and P ⊙ v, as the run's PT step takes them
            state._crn()
            embed = problem.embed
            if not train:  # the draw without dropout (the probe's per-molecule gradients are taken so)
                problem.embed = lambda p, g, *, train, embed=embed: embed(p, g, train=False)
            try:
                with _buffers_kept(problem):
                    _, mixed = pretrain_backward_with_mixed_term(lambda th, ph: problem.pretrain_loss(th, ph, batch),
                                                                 state.theta, state.phi, u)
            finally:
                problem.embed = embed
            m = mixed["example_logits"]
            fused[name][rows] += -alpha * (m.to_dense() if m.is_sparse else m).double()[rows]
        r = rows.numpy()
        centred[r] += adam[r] - adam[r].mean()  # the probe centred within the batch, as normalised weights see it
        batches_of[r] += 1
        seen[rows] = True
    d, a, f = total[seen].numpy(), adam[seen.numpy()], flags[seen.numpy()]
    c = centred[seen.numpy()] / batches_of[seen.numpy()]
    return {"molecules": int(seen.sum()),
            "derivative_auroc": round(float(roc_auc_score(f, d)), 4),  # corrupted: derivative > 0
            "probe_auroc": round(float(roc_auc_score(f, -a)), 4),
            "probe_centred_auroc": round(float(roc_auc_score(f, -c)), 4),
            "spearman_derivative_vs_minus_alignment": round(float(spearmanr(d, -a)[0]), 4),
            "sign_agreement": round(float(np.mean(np.sign(d) == np.sign(-a))), 4),
            "mean_derivative_corrupted": float(d[f].mean()), "mean_derivative_clean": float(d[~f].mean()),
            "accumulated_draw_auroc": round(float(roc_auc_score(f, drawn[seen].numpy())), 4),
            "spearman_accumulated_draw_vs_derivative": round(float(spearmanr(drawn[seen].numpy(), d)[0]), 4),
            **{f"fused_{name}_draw_auroc": round(float(roc_auc_score(f, x[seen].numpy())), 4) for name, x in fused.items()},
            **{f"spearman_fused_{name}_draw_vs_derivative": round(float(spearmanr(x[seen].numpy(), d)[0]), 4)
               for name, x in fused.items()}}


def all_features(problem, params, chunk=512):
    """[N, 2] every PT molecule's :meth:`ExampleWeightNet.features` at θ (one forward, no dropout)."""
    n = len(problem.data.pretrain_positions)
    out = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            graphs = problem.data.pretrain_batch(torch.arange(start, min(start + chunk, n)))
            logits = problem.embed(params, graphs, train=False) @ params["pt.weight"].T + params["pt.bias"]
            out.append(ExampleWeightNet.features(logits, graphs.y))
    return torch.cat(out)


def current_losses(problem, params, chunk=512):
    """Every PT molecule's loss at θ (no dropout): the mean BCE over its observed tasks."""
    return all_features(problem, params, chunk)[:, 0].numpy()


def alignment_by_loss(align, loss, flags):
    """The premise a loss-fed weight rule depends on: does the one-step clean objective want the
    corrupted molecules down-weighted, at every loss level? Alignment ⟨∇θ ℓ_i, ∇θ L_clean⟩ > 0
    means a step on molecule i lowers the clean loss (its weight's hypergradient says: raise it).
    Mean alignment per quintile of the molecules' PT loss, corrupted and clean apart; the share
    of corrupted molecules with positive alignment; Spearman ρ of alignment with loss."""
    from scipy.stats import spearmanr

    edges = np.quantile(loss, [0.2, 0.4, 0.6, 0.8])
    quintile = np.digitize(loss, edges)

    def means(mask):
        return [round(float(align[mask & (quintile == q)].mean()), 6) if (mask & (quintile == q)).any() else None
                for q in range(5)]

    return {"by_loss_quintile": {"corrupted": means(flags), "clean": means(~flags),
                                 "corrupted_share": [round(float(flags[quintile == q].mean()), 3) for q in range(5)]},
            "corrupted_positive_share": round(float((align[flags] > 0).mean()), 4),
            "clean_positive_share": round(float((align[~flags] > 0).mean()), 4),
            "spearman_with_loss": round(float(spearmanr(align, loss)[0]), 4)}


def auroc_within_loss_quintiles(flags, score, loss):
    """Does a score rank the corrupted molecules beyond what their loss says? AUROC of ``score``
    for the corrupted flag within each quintile of ``loss`` (the uniform run's loss ranking), and
    their mean weighted by the molecules of each quintile with both classes present: 0.5 where the
    score adds nothing to the loss, so a rule on the loss alone cannot beat loss ranking there."""
    edges = np.quantile(loss, [0.2, 0.4, 0.6, 0.8])
    quintile = np.digitize(loss, edges)
    per, sizes = [], []
    for q in range(5):
        m = quintile == q
        if flags[m].any() and not flags[m].all():
            per.append(round(float(roc_auc_score(flags[m], score[m])), 4))
            sizes.append(int(m.sum()))
        else:
            per.append(None)
    mean = round(float(np.average([a for a in per if a is not None], weights=sizes)), 4) if sizes else None
    return {"mean": mean, "by_loss_quintile": per}


def linear_probe_auroc(problem, params, clean):
    """B3DB test AUROC of logistic regression on the frozen embedding (C picked on valid)."""
    enc = problem.encoder_with(params).eval()

    def feats(split):
        pos = torch.cat([clean.split["ft_train"], clean.split["metaval"]]) if split == "train" else clean.split[split]
        b = clean.downstream_batch(pos)
        with torch.no_grad():
            return enc(b).numpy(), b.y[:, 0].numpy()

    (xtr, ytr), (xva, yva), (xte, yte) = feats("train"), feats("valid"), feats("test")
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    best = None
    for c in (0.01, 0.1, 1.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit((xtr - mu) / sd, ytr)
        val = roc_auc_score(yva, clf.predict_proba((xva - mu) / sd)[:, 1])
        if best is None or val > best[0]:
            best = (val, roc_auc_score(yte, clf.predict_proba((xte - mu) / sd)[:, 1]), c)
    return {"valid_auroc": round(best[0], 4), "test_auroc": round(best[1], 4), "C": best[2]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain", type=int, default=4000, help="pre-training molecules")
    ap.add_argument("--clean-val", type=int, default=1000, help="held-out clean ChEMBL molecules (chembl target)")
    ap.add_argument("--downstream", type=int, default=2000, help="B3DB training molecules (a fifth as many valid/test)")
    ap.add_argument("--corrupt", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--val-batch", type=int, default=None,
                    help="FT-train and MetaFT-validation batch size of the meta-step (default: --batch)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--pt-lr", type=float, default=1e-3)
    ap.add_argument("--inner-lr", type=float, default=0.1)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--emb-dim", type=int, default=64)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--targets", default="b3db,chembl")
    ap.add_argument("--optimizers", default="lazy_sgd,lazy_adam,adam")
    ap.add_argument("--meta-lr", default="lazy_sgd=0.1,lazy_adam=0.05,adam=0.05",
                    help="φ learning rate per optimiser")
    ap.add_argument("--estimator", choices=("paper", "default", "accumulated"), default="paper",
                    help="paper: Neumann M = 1, α = PT lr, mixed term on the PT batch just taken; default: "
                         "the trainer's default (one step in Adam's geometry, mixed term on the upcoming batch); "
                         "accumulated: every PT batch's mixed term against the last validation direction")
    ap.add_argument("--average", choices=("none", "polyak", "ema"), default="none",
                    help="the φ read at the end: the last one, or averaged over meta-steps")
    ap.add_argument("--direction-decay", type=float, default=0.0,
                    help="accumulated: the draws' validation direction as an EMA over meta-steps with this decay")
    ap.add_argument("--head-start", choices=("carried", "initial"), default="carried",
                    help="each meta-step fine-tunes from the last meta-step's head (carried) or from ψ₀ (initial)")
    ap.add_argument("--normalize", action="store_true", help="example weights scaled to mean 1 within each batch")
    ap.add_argument("--family", choices=("example_weights", "weight_net"), default="example_weights",
                    help="the learned weights: one logit per molecule, or one network of each molecule's loss and "
                         "share of observed labels (Meta-Weight-Net)")
    ap.add_argument("--no-downstream", action="store_true")
    ap.add_argument("--no-clean", action="store_true", help="skip the clean-data uniform run")
    ap.add_argument("--no-probe", action="store_true", help="skip the alignment probe")
    ap.add_argument("--sign-check", type=int, default=0, metavar="BATCHES",
                    help="at --probe-steps of each meta run: its exact one-step derivative per molecule over BATCHES "
                         "upcoming PT batches, against the alignment probe (exploratory)")
    ap.add_argument("--probe-steps", type=lambda v: sorted({int(x) for x in v.split(",") if x}), default=[],
                    help="also measure the premise (alignment by loss quintile) at these PT steps of the uniform run")
    ap.add_argument("--influence", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                    metavar="FRACTIONS",
                    help="also rank by the IFT influence on the clean loss at the uniform run's end, the Hessian "
                         "damped by each FRACTION of its largest eigenvalue (e.g. 0.1,0.01)")
    ap.add_argument("--min-labels", type=int, default=1,
                    help="pre-train (and hold out) only molecules with at least this many observed labels")
    ap.add_argument("--detectability", type=int, default=0, metavar="FOLDS",
                    help="also rank by out-of-fold PT loss (uniform models on the other FOLDS-1 folds)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.detectability == 1 or args.detectability < 0:
        ap.error("--detectability: 0 (off) or at least 2 folds (one fold leaves no molecules to pre-train on)")
    if args.min_labels < 1:
        ap.error("--min-labels: at least 1")
    if not all(0 < f < float("inf") for f in args.influence):
        ap.error("--influence: damping fractions must be positive and finite")
    lrs = {k: float(v) for k, v in (kv.split("=") for kv in args.meta_lr.split(","))}
    started = time.perf_counter()
    runs = []

    def record(row):
        runs.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    for seed in (int(s) for s in args.seeds.split(",")):
        datas, flagged, clean = planted_data(args, seed)
        flags = flagged.numpy()
        t0 = time.perf_counter()
        probe = None
        if args.probe_steps:  # the premise along the run: alignment by the loss of that moment
            def probe(problem, params, trainer):
                plain, adam = alignment_probe(problem, params, datas["chembl"],
                                              adam_preconditioner(trainer.pt_opt, trainer.params))
                loss = current_losses(problem, params)
                return {"sgd": alignment_by_loss(plain, loss, flags), "adam": alignment_by_loss(adam, loss, flags)}
        base = pretrain(args, datas["b3db"], seed, probe=probe)
        row = {"seed": seed, "method": "uniform (corrupted)", "loss_ranking_auroc": round(roc_auc_score(flags, base["mean_loss"]), 4),
               "seconds": round(time.perf_counter() - t0, 1)}
        if not args.no_downstream:
            row["downstream"] = linear_probe_auroc(base["encoder"], base["params"], clean)
        if not args.no_probe:
            align = alignment_probe(base["encoder"], base["params"], datas["chembl"])
            row["alignment_probe_auroc"] = round(roc_auc_score(flags, -align), 4)
            row["alignment_premise"] = alignment_by_loss(align, base["mean_loss"], flags)
            row["alignment_probe_auroc_within_loss_quintiles"] = auroc_within_loss_quintiles(flags, -align,
                                                                                             base["mean_loss"])
        if base["probes"]:
            row["alignment_premise_at_step"] = base["probes"]
        if args.influence:
            t1 = time.perf_counter()
            scores, info = influence_probe(base["encoder"], base["params"], datas["chembl"], args.influence)
            row["influence_probe"] = {str(f): {"auroc": round(roc_auc_score(flags, sc), 4),
                                               "within_loss_quintiles": auroc_within_loss_quintiles(
                                                   flags, sc, base["mean_loss"])} for f, sc in scores.items()}
            row["influence_probe_solve"] = {**info, "seconds": round(time.perf_counter() - t1, 1)}
        if args.detectability:
            t1 = time.perf_counter()
            oof = out_of_fold_loss(args, datas["b3db"], seed, args.detectability)
            row["out_of_fold_loss_auroc"] = round(roc_auc_score(flags, oof), 4)
            row["out_of_fold_folds"], row["out_of_fold_seconds"] = args.detectability, round(time.perf_counter() - t1, 1)
        record(row)
        if not args.no_clean and not args.no_downstream:
            t0 = time.perf_counter()
            ref = pretrain(args, clean, seed)
            record({"seed": seed, "method": "uniform (clean)", "seconds": round(time.perf_counter() - t0, 1),
                    "downstream": linear_probe_auroc(ref["encoder"], ref["params"], clean)})
        for target in filter(None, args.targets.split(",")):  # --targets '': the uniform run (and probe) only
            for opt in args.optimizers.split(","):
                t0 = time.perf_counter()
                sign_probe = None
                if args.sign_check:  # the estimator's own truth against the alignment probe, at --probe-steps
                    def sign_probe(problem, params, trainer):
                        return sign_check(problem, trainer, datas["chembl"], flags, args.sign_check)
                res = pretrain(args, datas[target], seed, meta=(opt, lrs[opt]), pt_head_objective=target == "chembl_pt",
                               probe=sign_probe)
                w, drawn = res["weights"], res["drawn"]
                net = args.family == "weight_net"
                row = {
                    "seed": seed, "method": "learned example weight net" if net else "learned example weights",
                    "target": target, "optimizer": opt, "meta_lr": lrs[opt],
                    "weight_auroc": round(roc_auc_score(flags, -w), 4),
                    # the net's weights move for every molecule: the drawn ones are not special
                    **({} if net else {"weight_auroc_drawn": round(roc_auc_score(flags[drawn], -w[drawn]), 4)}),
                    "drawn_share": round(float(drawn.mean()), 4),
                    # beyond the loss: within quintiles of this seed's uniform loss ranking
                    "weight_auroc_within_loss_quintiles": auroc_within_loss_quintiles(flags, -w, base["mean_loss"]),
                    "mean_weight_corrupted": round(float(w[flags].mean()), 4),
                    "mean_weight_clean": round(float(w[~flags].mean()), 4),
                    "skipped_meta_steps": res["skipped"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                if res["probes"]:
                    row["sign_check_at_step"] = res["probes"]
                if net:  # the net's input ranks too: does the learned rule add to the loss it reads?
                    row["final_loss_auroc"] = round(roc_auc_score(flags, res["final_loss"]), 4)
                    row["net_summary"] = {k: round(v, 4) for k, v in res["summary"].items()}
                if not args.no_downstream:
                    row["downstream"] = linear_probe_auroc(res["encoder"], res["params"], clean)
                record(row)
    result = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "commit": source_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "config": vars(args),
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(markdown(result))


def markdown(result):
    lines = ["# Planted label noise: learned example weights vs loss ranking", "",
             f"`{result['command']}` (commit {result['commit'][:10]}, {result['wall_seconds']} s)", "",
             "| seed | method | meta-objective | φ optimiser | AUROC (corrupted vs clean) | over drawn molecules | "
             "mean weight corrupted / clean | B3DB linear-probe test AUROC | AUROC within quintiles of the uniform "
             "run's loss (0.5: nothing beyond the loss) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        auroc = r.get("weight_auroc", r.get("loss_ranking_auroc", ""))
        if "final_loss_auroc" in r:  # the weight net: beside the ranking by its input, the final loss
            auroc = f"{auroc} (final loss: {r['final_loss_auroc']})"
        if "out_of_fold_loss_auroc" in r:
            lines.append(f"| {r['seed']} | out-of-fold loss ranking ({r['out_of_fold_folds']} folds; premise) | | | "
                         f"{r['out_of_fold_loss_auroc']} | | | | |")
        for frac, probe in r.get("influence_probe", {}).items():
            lines.append(f"| {r['seed']} | influence probe, (H + λI)⁻¹, λ = {frac}·λmax + 2·max(0, −λmin) (diagnostic) | "
                         f"chembl (all held-out) | | "
                         f"{probe['auroc']} | | | | {probe['within_loss_quintiles']['mean']} |")
        if "alignment_probe_auroc" in r:
            within = r.get("alignment_probe_auroc_within_loss_quintiles", {}).get("mean", "")
            lines.append(f"| {r['seed']} | alignment probe (diagnostic) | chembl (all held-out) | | "
                         f"{r['alignment_probe_auroc']} | | | | {within} |")
        ds = r.get("downstream", {}).get("test_auroc", "")
        means = f"{r['mean_weight_corrupted']} / {r['mean_weight_clean']}" if "mean_weight_clean" in r else ""
        kind = "uniform (corrupted): loss ranking" if "loss_ranking_auroc" in r else r["method"]
        lines.append(f"| {r['seed']} | {kind} | {r.get('target', '')} | {r.get('optimizer', '')} | {auroc} | "
                     f"{r.get('weight_auroc_drawn', '')} | {means} | {ds} | "
                     f"{r.get('weight_auroc_within_loss_quintiles', {}).get('mean', '')} |")
    checks = [(r["seed"], int(step), c) for r in result["runs"] for step, c in r.get("sign_check_at_step", {}).items()]
    if checks:
        lines += ["", "## Sign check: the run's own meta-objective against the alignment probe", "",
                  "Exact one-step derivative dL_meta/dφ_i of the meta-step's objective per molecule (positive: raising "
                  "its weight raises the loss) over the upcoming PT batches, against −⟨P ⊙ ∇θ ℓ_i, ∇θ L_clean⟩ at the "
                  "same θ.", "",
                  "| seed | step | molecules | AUROC of derivative (corrupted) | AUROC of −alignment | "
                  "Spearman ρ | sign agreement | mean derivative corrupted / clean | AUROC of the accumulated "
                  "estimator's draw | its Spearman ρ with the derivative |", "|---|---|---|---|---|---|---|---|---|---|"]
        for seed, step, c in sorted(checks, key=lambda t: (t[0], t[1])):
            lines.append(f"| {seed} | {step} | {c['molecules']} | {c['derivative_auroc']} | {c['probe_auroc']} | "
                         f"{c['spearman_derivative_vs_minus_alignment']} | {c['sign_agreement']} | "
                         f"{c['mean_derivative_corrupted']:.3g} / {c['mean_derivative_clean']:.3g} | "
                         f"{c.get('accumulated_draw_auroc', '')} | {c.get('spearman_accumulated_draw_vs_derivative', '')} |")
        variants = {"fresh": "fused (the run's forward difference), fresh v",
                    "stale": "fused, the run's own v (last meta-step's)",
                    "averaged": "fused, v averaged over 16 validation batches",
                    "averaged_eval": "the same without dropout",
                    "probe_v": "fused, v = the probe's clean gradient",
                    "probe_v_eval": "the same without dropout",
                    "carried_no_unroll": "fused, v averaged (16 batches) at the carried head, no unrolled step",
                    "zero_head": "fused, v averaged (16 batches), the head correction ψ at zero",
                    "zero_head_no_unroll": "fused, v averaged (16 batches), ψ at zero, no unrolled step"}
        lines += ["", "Draws at the same state and batches: AUROC on the corrupted flag (above 0.5: corrupted molecules' "
                  "weights pushed down) and Spearman ρ with the exact derivative (one validation batch).", "",
                  "| seed | step | draw | AUROC | ρ with the derivative |", "|---|---|---|---|---|"]
        for seed, step, c in sorted(checks, key=lambda t: (t[0], t[1])):
            for key, label in variants.items():
                if f"fused_{key}_draw_auroc" in c:
                    lines.append(f"| {seed} | {step} | {label} | {c[f'fused_{key}_draw_auroc']} | "
                                 f"{c[f'spearman_fused_{key}_draw_vs_derivative']} |")
            if "probe_centred_auroc" in c:
                lines.append(f"| {seed} | {step} | the probe (no dropout) centred within each PT batch | "
                             f"{c['probe_centred_auroc']} | |")
    premises = [r for r in result["runs"] if "alignment_premise" in r]
    if premises:
        lines += ["", "## Premise: alignment ⟨∇θ ℓ_i, ∇θ L_clean⟩ by PT-loss quintile (uniform run's end)", "",
                  "Positive: a step on the molecule lowers the clean ChEMBL loss, so the one-step hypergradient "
                  "asks to raise its weight.", "",
                  "| seed | molecules | loss quintile 1 (lowest) | 2 | 3 | 4 | 5 (highest) | share with alignment > 0 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in premises:
            a = r["alignment_premise"]
            for kind in ("corrupted", "clean"):
                cells = " | ".join("" if v is None else f"{v:.3g}" for v in a["by_loss_quintile"][kind])
                lines.append(f"| {r['seed']} | {kind} | {cells} | {a[kind + '_positive_share']} |")
            share = " | ".join(f"{v:.0%}" for v in a["by_loss_quintile"]["corrupted_share"])
            lines.append(f"| {r['seed']} | share corrupted | {share} | |")
            lines.append(f"| {r['seed']} | Spearman ρ(alignment, loss) | {a['spearman_with_loss']} | | | | | |")
        along = [(r["seed"], int(step), step_probes) for r in premises
                 for step, step_probes in r.get("alignment_premise_at_step", {}).items()]
        if along:
            lines += ["", "### Along the run: the same at PT step t (loss quintiles of that moment's loss)", "",
                      "sgd: ⟨∇θ ℓ_i, ∇θ L_clean⟩; adam: ⟨P ⊙ ∇θ ℓ_i, ∇θ L_clean⟩ with the run's Adam P = 1/(√v̂ + ε) "
                      "at that step, the geometry the accumulated estimator uses.", "",
                      "| seed | step | step rule | molecules | quintile 1 | 2 | 3 | 4 | 5 | share > 0 | ρ(alignment, loss) |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for seed, step, step_probes in sorted(along, key=lambda t: (t[0], t[1])):
                for rule, a in step_probes.items():
                    for kind in ("corrupted", "clean"):
                        cells = " | ".join("" if v is None else f"{v:.3g}" for v in a["by_loss_quintile"][kind])
                        lines.append(f"| {seed} | {step} | {rule} | {kind} | {cells} | {a[kind + '_positive_share']} | "
                                     f"{a['spearman_with_loss'] if kind == 'corrupted' else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
