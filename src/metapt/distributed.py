"""Data-parallel pre-training and meta-steps on ``torch.distributed`` (launched by ``torchrun``).

One process per device; every process holds a full replica of θ, φ and the FT head ψ.

* **Sharding** is integer arithmetic on batch indices. :class:`ShardedProblem` is
  process ``rank``'s view of a problem: its batch ``i`` of every stream (PT,
  FT-train, MetaFT-validation) is the base problem's batch ``i * world + rank``.
  Global step ``i`` therefore consumes the base batches ``i*W … i*W + W-1``, the
  one-process data order taken W batches at a time; the global PT batch is W
  times the problem's (per-process) batch size.
* **Pre-training** runs through PyTorch's ``DistributedDataParallel``: θ's tensors
  are the ``nn.Parameter``\\ s of a small module whose ``forward(φ, batch)`` is
  ``problem.pretrain_loss(θ, φ, batch)``; the trainer's θ dict holds the *same*
  Parameter objects, so the PT optimiser, ``functional_call`` and the meta-step
  all see one θ. DDP averages the PT gradient over processes (for a loss that is a
  mean over equal-size shards: the gradient of the global batch).
* **Meta-steps**: every process computes the hypergradient on its own PT,
  MetaFT-validation and FT-train batches. DDP does not synchronise gradients of
  gradients (the hypergradient is computed on detached copies of θ), so it is
  averaged explicitly with ``all_reduce`` (the strategy's ``reduce_hypergrad``), and
  the FT head after each update (``reduce_head``), so every process applies the
  same φ update and keeps the same head. The hypergradient is not linear in the
  batch (it multiplies H⁻¹, the mixed partial and dL_V/dθ), so a W-process
  meta-step equals a one-process meta-step that averages the W per-shard
  hypergradients (``MetaPretrainer(strategy=MeanOverViews([ShardedProblem(p, r, W) for r ...]))``),
  not the hypergradient of the concatenated batches. A process whose
  hypergradient is unusable poisons the mean with NaN, so all skip alike.
* **Replicas** stay bitwise identical (all-reduce results are the same on every
  process); :meth:`DistributedContext.check_replicas` verifies it, and the
  trainer calls it every ``check_every`` steps in debug mode.
* **Writes**: only rank 0 (``ctx.is_main``) writes metrics, reports and
  checkpoints; every process loads the same checkpoint into its trainer
  (:class:`metapt.session.Session` with ``dist=ctx`` does both, and keeps each
  process's RNG state in the file).

Usage (what a job does; without torchrun's environment it is a one-process run)::

    ctx = init_distributed(debug=False)
    problem = ctx.shard(problem)                 # this process's batches
    trainer = MetaPretrainer(problem, ..., strategy=ctx.strategy())
    session = Session(RunFolder(run_dir), dist=ctx)   # only rank 0 writes metrics and checkpoints
    session.train("pretrain", trainer, steps)
    ctx.close()
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .errors import LaunchError, UserError
from .problem import MetaProblem, Params
from .strategy import Strategy

#: the variables torchrun sets for every process
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(LaunchError, RuntimeError):
    """The torch.distributed environment is incomplete or inconsistent."""


class ReplicaMismatchError(RuntimeError):
    """θ, φ or the head differ between processes of a data-parallel run."""


# ---- sharding -------------------------------------------------------------------------------


class ShardedProblem:
    """Process ``rank``'s view of ``problem``: batch ``i`` is the base batch ``i * world + rank``.

    Applies to the PT, FT-train and MetaFT-validation streams alike. Losses,
    ``describe_metaparams`` and every other attribute are the base problem's.
    """

    def __init__(self, problem: MetaProblem, rank: int, world: int):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"ShardedProblem: need 0 <= rank < world, got rank={rank}, world={world}")
        self.base, self.rank, self.world = problem, rank, world

    def _index(self, index: int) -> int:
        return index * self.world + self.rank

    def pretrain_batch(self, index: int) -> Any:
        return self.base.pretrain_batch(self._index(index))

    def finetune_batch(self, index: int) -> Any:
        return self.base.finetune_batch(self._index(index))

    def metaval_batch(self, index: int) -> Any:
        return self.base.metaval_batch(self._index(index))

    def pretrain_loss(self, params: Params, metaparams: Params, batch: Any) -> Tensor:
        return self.base.pretrain_loss(params, metaparams, batch)

    def finetune_loss(self, params: Params, head: Params, batch: Any) -> Tensor:
        return self.base.finetune_loss(params, head, batch)

    def describe_metaparams(self, metaparams: Params) -> Mapping[str, float]:
        return self.base.describe_metaparams(metaparams)

    def __getattr__(self, name: str) -> Any:  # initial values, evaluation helpers, data: the base problem's
        if name == "base":  # not yet set (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)


# ---- process group --------------------------------------------------------------------------


@dataclass
class DistributedContext:
    """This process's place in the run; a one-process run when ``distributed`` is False.

    Attributes:
        rank, world_size, local_rank: from torchrun's environment (0, 1, 0 alone).
        backend: ``"gloo"`` or ``"nccl"``; None when not distributed.
        device: where this process computes (``cuda:LOCAL_RANK`` with NCCL, else CPU).
        debug: check that replicas agree every step (see :meth:`strategy`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    debug: bool = False

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics, reports and checkpoints."""
        return self.rank == 0

    # ---- what a job wires in ----------------------------------------------------------------

    def shard(self, problem: MetaProblem) -> MetaProblem:
        """This process's view of ``problem`` (the problem itself in a one-process run)."""
        return ShardedProblem(problem, self.rank, self.world_size) if self.distributed else problem

    def strategy(
        self,
        *,
        check_every: int | None = None,
        sync_buffers_of: nn.Module | None = None,
        find_unused_parameters: bool = False,
    ) -> Strategy:
        """The trainer's strategy (``MetaPretrainer(strategy=...)``): :class:`DataParallel`
        under torchrun, the plain one-process :class:`metapt.strategy.Strategy` otherwise.

        Args:
            check_every: verify that replicas agree every this many PT steps
                (default: every step in debug mode, never otherwise).
            sync_buffers_of: a module whose buffers (batch-norm statistics) DDP
                broadcasts from rank 0 before every PT forward, as DDP does for
                its own module.
            find_unused_parameters: passed to DDP, for a θ part of which some
                PT batches do not use.
        """
        if not self.distributed:
            return Strategy()
        if check_every is None:
            check_every = 1 if self.debug else 0
        return DataParallel(self, check_every=check_every, sync_buffers_of=sync_buffers_of,
                            find_unused_parameters=find_unused_parameters)

    # ---- collectives ------------------------------------------------------------------------

    def all_reduce_mean(self, tree: Mapping[str, Tensor]) -> Params:
        """The mean over processes of a dict of tensors (a new dict; one all-reduce per dtype)."""
        if not self.distributed:
            return dict(tree)
        out: Params = {}
        for keys, flat in _flatten_by_dtype(tree):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            out.update(_unflatten(tree, keys, flat))
        return {k: out[k] for k in tree}

    def broadcast_(self, tree: Mapping[str, Tensor], src: int = 0) -> None:
        """Overwrite a dict of tensors, in place, with rank ``src``'s values."""
        if not self.distributed:
            return
        with torch.no_grad():
            for keys, flat in _flatten_by_dtype(tree):
                dist.broadcast(flat, src=src)
                for k, v in _unflatten(tree, keys, flat).items():
                    tree[k].copy_(v)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def check_replicas(self, trainer: Any, *, atol: float = 0.0) -> None:
        """Raise :class:`ReplicaMismatchError` on every process unless θ, φ, ψ and the counters agree.

        Each process compares its values with rank 0's (``atol`` = 0: bitwise;
        NaN equals NaN); the mismatches of all processes are gathered, so every
        process raises the same message, naming ranks, tensors and the largest
        difference. A collective: call it on every process at the same point.
        """
        if not self.distributed:
            return
        state = replica_state(trainer)
        ref = {k: v.detach().clone() for k, v in state.items()}
        self.broadcast_(ref)
        mine = []
        for k, v in state.items():
            v = v.detach()
            if not torch.allclose(v, ref[k], rtol=0.0, atol=atol, equal_nan=True):
                mine.append((k, float((v.double() - ref[k].double()).abs().nan_to_num(float("inf")).max())))
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        bad = [(rank, k, d) for rank, found in enumerate(everyone) for k, d in found]
        if bad:
            lines = "; ".join(f"rank {r} {k} (max |diff| {d:.3g})" for r, k, d in bad[:10])
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise ReplicaMismatchError(
                f"data-parallel replicas differ from rank 0 at step {getattr(trainer, 'step', '?')}: {lines}{more}. "
                "Every process must apply the same updates: pass strategy=ctx.strategy() to the trainer, and "
                "change θ, φ or the head only through it (or identically on every process)"
            )

    # ---- files ------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the process group (after a barrier, so no process exits while others still talk)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def __enter__(self) -> DistributedContext:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self.distributed and dist.is_initialized():  # no barrier: the others may be gone
            dist.destroy_process_group()


#: the longest --peer-timeout, in minutes (a timedelta holds up to 1.4e15)
MAX_PEER_TIMEOUT = 10_000_000


def launch(device: str = "cpu", peer_timeout: float = 30.0, *, debug: bool = False) -> DistributedContext:
    """The process group of a torchrun launch, else a one-process context, for a run on ``device``.

    NCCL (process r on ``cuda:LOCAL_RANK``) when ``device`` is CUDA (``auto`` on a machine with
    CUDA), gloo on CPU. ``peer_timeout`` (minutes) bounds every wait at a synchronisation point: it
    must cover the longest skew between processes, and a stalled peer then stops the run with a
    message (:func:`is_peer_timeout`) instead of hanging for hours.
    """
    import math

    if not math.isfinite(peer_timeout) or peer_timeout > MAX_PEER_TIMEOUT:
        raise LaunchError(f"--peer-timeout must be a finite number of minutes, at most {MAX_PEER_TIMEOUT:,} "
                          f"(about {MAX_PEER_TIMEOUT // 525_600} years), got {peer_timeout}")
    cuda = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
    return init_distributed("nccl" if cuda else "gloo", debug=debug, timeout=datetime.timedelta(minutes=peer_timeout))


def is_peer_timeout(err: BaseException) -> bool:
    """A collective (gloo or NCCL) that gave up waiting for another process."""
    text = str(err).lower()
    return "timed out" in text or "timeout" in text and ("gloo" in text or "nccl" in text or "collective" in text)


def on_main(ctx: DistributedContext, fn: Any) -> Any:
    """``fn()`` on rank 0 only; every process gets its result, or raises its error (rank 0 the
    error itself; the others a :class:`metapt.errors.UserError` with its message, or a
    RuntimeError for a crash)."""
    if not ctx.distributed:
        return fn()
    box: list = [None, None, False]
    error = None
    if ctx.is_main:
        try:
            box = [fn(), None, False]
        except Exception as err:  # noqa: BLE001 (re-raised on every process below)
            error, box = err, [None, str(err), isinstance(err, UserError)]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise (UserError if box[2] else RuntimeError)(box[1] if box[2] else f"rank 0 failed: {box[1]}")
    return box[0]


def init_distributed(
    backend: str | None = None,
    *,
    debug: bool = False,
    timeout: datetime.timedelta | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedContext:
    """Join the process group torchrun describes in the environment, or run alone.

    Without RANK, WORLD_SIZE and LOCAL_RANK in the environment this is a
    one-process run (``ctx.distributed`` is False; every method is a no-op).
    With any of them, all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT must be set (torchrun sets them).

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available
            (the process's device is ``cuda:LOCAL_RANK``), else gloo on CPU.
        debug: verify replicas every step (see :meth:`DistributedContext.strategy`).
        timeout: for collectives (torch's default when None).
        env: the environment to read (``os.environ`` when None).
    """
    env = os.environ if env is None else env
    present = [k for k in ENV_VARS if env.get(k, "") != ""]
    if not any(k in present for k in ENV_VARS[:3]):
        return DistributedContext(debug=debug)
    missing = [k for k in ENV_VARS if k not in present]
    if missing:
        raise DistributedSetupError(
            f"incomplete torch.distributed environment: {', '.join(present)} set but {', '.join(missing)} missing. "
            "Launch with torchrun (e.g. `torchrun --nproc_per_node 2 -m metapt run CONFIG`), which sets all of "
            f"{', '.join(ENV_VARS)}; or unset them for a one-process run"
        )
    try:
        rank, world, local_rank = (int(env[k]) for k in ENV_VARS[:3])
    except ValueError as e:
        raise DistributedSetupError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {e}") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise DistributedSetupError(f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0; got RANK={rank}, "
                                    f"WORLD_SIZE={world}, LOCAL_RANK={local_rank}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise DistributedSetupError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    device = torch.device("cpu")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedSetupError("backend 'nccl' needs CUDA, and none is available; use 'gloo' on CPU")
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} "
                                        "CUDA devices; start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise DistributedSetupError(f"a process group is already initialised as rank {dist.get_rank()} of "
                                        f"{dist.get_world_size()}, not rank {rank} of {world}")
    else:
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        if backend == "nccl":
            kwargs["device_id"] = device
        # env:// reads MASTER_ADDR/PORT; rank and world are passed explicitly from what was validated
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend,
                              device=device, debug=debug)


# ---- the trainer's data-parallel hooks ------------------------------------------------------


class _Theta(nn.Module):
    """θ as ``nn.Parameter``\\ s, ``forward(φ, batch) = problem.pretrain_loss(θ, φ, batch)``: what DDP wraps."""

    def __init__(self, problem: MetaProblem, theta: Mapping[str, Tensor], buffers_of: nn.Module | None):
        super().__init__()
        self.problem = problem  # a plain attribute: a problem is not an nn.Module
        self.names = list(theta)
        for i, k in enumerate(self.names):  # θ's keys hold dots, which module attribute names may not
            self.register_parameter(f"p{i}", nn.Parameter(theta[k].detach(), requires_grad=True))
        if buffers_of is not None:  # the same tensor objects: DDP's broadcasts land in the problem's module
            for i, (_, b) in enumerate(buffers_of.named_buffers()):
                self.register_buffer(f"b{i}", b)

    def theta(self) -> Params:
        return {k: getattr(self, f"p{i}") for i, k in enumerate(self.names)}

    def forward(self, phi: Params, batch: Any) -> Tensor:
        return self.problem.pretrain_loss(self.theta(), phi, batch)


class DataParallel(Strategy):
    """Data-parallel execution of Algorithm 1 (build it with :meth:`DistributedContext.strategy`).

    The PT step runs through DistributedDataParallel (θ's gradient averaged over
    processes); each meta-step's hypergradient and every update of the FT head are
    averaged with an explicit all-reduce (DDP does not synchronise gradients of
    gradients); metrics are averaged so rank 0 logs global numbers.
    """

    def __init__(self, ctx: DistributedContext, *, check_every: int = 0, sync_buffers_of: nn.Module | None = None,
                 find_unused_parameters: bool = False):
        self.ctx, self.check_every = ctx, check_every
        self.sync_buffers_of, self.find_unused_parameters = sync_buffers_of, find_unused_parameters
        self.module: DistributedDataParallel | None = None
        self._theta: Params | None = None

    def setup(self, trainer: Any) -> None:
        """Make ``trainer.params`` the Parameters of a DDP module; start every replica from rank 0's θ, φ, ψ."""
        if self.module is not None:
            raise RuntimeError("a DataParallel strategy serves one trainer; call ctx.strategy() for each")
        if self.ctx.device.type == "cuda":
            off = [k for k, v in {**trainer.params, **trainer.metaparams, **trainer.head}.items()
                   if v.device != self.ctx.device]
            if off:
                raise DistributedSetupError(f"with NCCL, θ, φ and the head must be on {self.ctx.device} "
                                            f"(this process's LOCAL_RANK device); not there: {off[:5]}")
        holder = _Theta(trainer.problem, trainer.params, self.sync_buffers_of)
        # DDP broadcasts the module's parameters and buffers from rank 0 on construction, and its
        # buffers (those of sync_buffers_of, if any) again before every forward
        self.module = DistributedDataParallel(holder, device_ids=None, find_unused_parameters=self.find_unused_parameters)
        self._theta = trainer.params = holder.theta()
        self.ctx.broadcast_(trainer.metaparams)
        self.ctx.broadcast_(trainer.head)

    def pretrain_backward(self, trainer: Any, batch: Any) -> Tensor:
        """L_PT through DDP, whose backward averages θ's gradient over processes."""
        if trainer.params is not self._theta:
            raise RuntimeError("DataParallel: θ must be the trainer's own dict (set up by setup())")
        phi = {k: v.detach() for k, v in trainer.metaparams.items()}
        loss = self.module(phi, batch)
        if loss.isfinite():
            loss.backward()
        return loss.detach()

    def reduce_hypergrad(self, hypergrad: Params) -> Params:
        """The mean over processes (collectives take dense tensors: row-sparse entries are densified)."""
        return self.ctx.all_reduce_mean({k: v.to_dense() if v.is_sparse else v for k, v in hypergrad.items()})

    def reduce_head(self, head: Params) -> Params:
        return self.ctx.all_reduce_mean(head)

    def reduce_max(self, value: float) -> float:
        flat = torch.tensor([value], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        return float(flat)

    def end_step(self, trainer: Any, metrics: Mapping[str, float]) -> dict[str, float]:
        """Metrics averaged over processes (so rank 0 logs the global step); replica check on schedule."""
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= self.ctx.world_size
        if self.check_every and trainer.step % self.check_every == 0:
            self.ctx.check_replicas(trainer)
        return dict(zip(keys, values.tolist()))


def replica_state(trainer: Any) -> Params:
    """What must agree across processes: θ, φ, the head and the step counters."""
    state = {f"params/{k}": v for k, v in trainer.params.items()}
    state.update({f"metaparams/{k}": v for k, v in trainer.metaparams.items()})
    state.update({f"head/{k}": v for k, v in trainer.head.items()})
    device = next(iter(trainer.params.values())).device
    state["counters"] = torch.tensor([trainer.step, trainer.meta_step_count, trainer.skipped],
                                     dtype=torch.float64, device=device)
    return state


def _flatten_by_dtype(tree: Mapping[str, Tensor]) -> list[tuple[list[str], Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for k, v in tree.items():
        groups.setdefault((v.dtype, v.device), []).append(k)
    return [(keys, torch.cat([tree[k].detach().reshape(-1) for k in keys])) for keys in groups.values()]


def _unflatten(tree: Mapping[str, Tensor], keys: list[str], flat: Tensor) -> Params:
    out, start = {}, 0
    for k in keys:
        n = tree[k].numel()
        out[k] = flat[start : start + n].view_as(tree[k])
        start += n
    return out
