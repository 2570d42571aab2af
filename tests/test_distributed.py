"""Data-parallel runs (metapt.distributed) against a one-process reference, on gloo with 2 processes.

One 2-process run (torch.multiprocessing, torchrun's environment variables, gloo)
is shared by the tests below; its processes save what the tests compare under a
harness folder, apart from the run's own folder, where only rank 0 may write.
"""

from __future__ import annotations

import datetime
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from metapt.distributed import (
    DistributedSetupError,
    ReplicaMismatchError,
    ShardedProblem,
    init_distributed,
)
from metapt.domains.synthetic.problem import SyntheticConfig, SyntheticTaskWeighting
from metapt.hypergrad import Neumann, sgd
from metapt.runs import RunFolder
from metapt.session import Session
from metapt.schema import CheckpointConfig
from metapt.strategy import MeanOverViews, Strategy
from metapt.trainer import MetaPretrainer, MetaSchedule

WORLD = 2
STEPS, SAVE_AT = 12, 8
SCHEDULE = MetaSchedule(interval=2, warmup_steps=2, unroll_steps=1, head_steps=1)  # meta-steps at 4, 6, ..., 12
CONFIG = SyntheticConfig(pretrain_examples=96, finetune_examples=32, metaval_examples=32, batch_size=16, seed=3)


def _problem():
    return SyntheticTaskWeighting(CONFIG, dtype=torch.float64)


def _trainer(problem, base, **kw):
    return MetaPretrainer(
        problem, base.initial_params(0), base.initial_head(), base.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        inner_optimizer=sgd(0.1), solver=Neumann(5, 0.01), schedule=SCHEDULE, **kw,
    )


class Recorder:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        self.rows.append((step, dict(metrics)))


def _state(t):
    return {"params": {k: v.detach().clone() for k, v in t.params.items()},
            "metaparams": {k: v.detach().clone() for k, v in t.metaparams.items()},
            "head": {k: v.detach().clone() for k, v in t.head.items()}}


# ---- the 2-process run --------------------------------------------------------------------------


def _worker(rank, port, run_dir, harness_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_distributed(timeout=datetime.timedelta(seconds=60))
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (rank, WORLD, "gloo", rank == 0)
    base = _problem()
    # different initial values on rank 1: rank 0's must win
    base.initial_params = lambda seed: SyntheticTaskWeighting.initial_params(base, seed + rank)
    base.initial_metaparams = lambda: {k: v + rank for k, v in SyntheticTaskWeighting.initial_metaparams(base).items()}
    rec = Recorder()
    trainer = _trainer(ctx.shard(base), base, loggers=[rec], strategy=ctx.strategy(check_every=1))
    session = Session(RunFolder(run_dir), CheckpointConfig(every=SAVE_AT), dist=ctx)  # checkpoint at SAVE_AT
    session.train("pt", trainer, STEPS)
    session.close()
    out = {"rows": rec.rows, "final": _state(trainer)}

    # resume: a fresh trainer (and DDP module) on every process loads rank 0's checkpoint
    resumed = _trainer(ctx.shard(base), base, strategy=ctx.strategy(check_every=1))
    session = Session(RunFolder(run_dir), CheckpointConfig(every=SAVE_AT), dist=ctx, resume=True)
    session.train("pt", resumed, STEPS)
    session.close()
    out.update(resumed=_state(resumed))

    # a deliberately desynchronised φ on rank 1 is caught, on every process
    if rank == 1:
        with torch.no_grad():
            trainer.metaparams["task_logits"][0] += 1e-6
    try:
        ctx.check_replicas(trainer)
        out["mismatch"] = None
    except ReplicaMismatchError as e:
        out["mismatch"] = str(e)
    torch.save(out, harness_dir / f"rank{rank}.pt")
    ctx.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    run_dir, harness = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("harness")
    mp.start_processes(_worker, args=(_free_port(), run_dir, harness), nprocs=WORLD, start_method="spawn", join=True)
    return run_dir, [torch.load(harness / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---- the one-process reference: no communication, no DDP, no ShardedProblem ---------------------


class _Concatenated:
    """Batch i is the W base batches i*W … i*W+W-1 concatenated into one (the global batch)."""

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def _cat(self, get, i):
        parts = [get(i * WORLD + r) for r in range(WORLD)]
        return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else tuple(map(torch.cat, zip(*parts)))

    def pretrain_batch(self, i):
        return self._cat(self.base.pretrain_batch, i)

    def finetune_batch(self, i):
        return self._cat(self.base.finetune_batch, i)

    def metaval_batch(self, i):
        return self._cat(self.base.metaval_batch, i)


class _Shard:
    def __init__(self, base, r):
        self.base, self.r = base, r

    def pretrain_batch(self, i):
        return self.base.pretrain_batch(i * WORLD + self.r)

    def finetune_batch(self, i):
        return self.base.finetune_batch(i * WORLD + self.r)

    def metaval_batch(self, i):
        return self.base.metaval_batch(i * WORLD + self.r)


def _reference(per_shard_hypergradients=True):
    """PT on the concatenated global batch; each meta-step averages the W per-shard hypergradients."""
    base = _problem()
    views = [_Shard(base, r) for r in range(WORLD)] if per_shard_hypergradients else None
    rec = Recorder()
    t = _trainer(_Concatenated(base), base, loggers=[rec], strategy=MeanOverViews(views) if views else None)
    t.run_until(STEPS)
    return rec.rows, _state(t)


def _assert_states_close(a, b, rtol):
    for group in ("params", "metaparams", "head"):
        for k in b[group]:
            torch.testing.assert_close(a[group][k], b[group][k], rtol=rtol, atol=1e-12, msg=lambda m, key=f"{group}/{k}": f"{key}: {m}")


# ---- tests --------------------------------------------------------------------------------------


def test_two_processes_match_the_one_process_reference(two_processes):
    _, outs = two_processes
    rows, ref = _reference()
    dist_rows = outs[0]["rows"]
    assert [s for s, _ in dist_rows] == [s for s, _ in rows] == list(range(1, STEPS + 1))
    meta = [(s, m["meta_loss"]) for s, m in rows if "meta_loss" in m]
    assert [s for s, _ in meta] == [4, 6, 8, 10, 12]
    for (s, m), (_, d) in zip(rows, dist_rows):  # trajectories: PT loss every step, meta-loss every meta-step
        for key in ("pt_loss", "meta_loss", "head_ft_loss", "warmup_ft_loss", "phi/noise_weight"):
            if key in m:
                assert d[key] == pytest.approx(m[key], rel=1e-10, abs=1e-12), (s, key)
    _assert_states_close(outs[0]["final"], ref, rtol=1e-10)
    # and φ moved, so the comparison has teeth
    assert (ref["metaparams"]["task_logits"] - _problem().initial_metaparams()["task_logits"]).abs().max() > 1e-2


def test_the_reference_is_not_the_hypergradient_of_the_concatenated_batch(two_processes):
    _, outs = two_processes
    _, concatenated = _reference(per_shard_hypergradients=False)
    diff = (outs[0]["final"]["metaparams"]["task_logits"] - concatenated["metaparams"]["task_logits"]).abs().max()
    assert diff > 1e-6  # far above the 1e-10 agreement above: the test tells the two apart


def test_replicas_are_identical_and_a_desynchronised_phi_is_caught(two_processes):
    _, outs = two_processes
    for group in ("params", "metaparams", "head"):  # bitwise, on both processes (also checked every step)
        for k in outs[0]["final"][group]:
            assert torch.equal(outs[0]["final"][group][k], outs[1]["final"][group][k]), (group, k)
    for out in outs:  # every process raises, naming the rank and tensor
        assert out["mismatch"] is not None and "step 12: rank 1 metaparams/task_logits (max |diff| 1e-06)." in out["mismatch"]


def test_only_rank_0_writes_and_every_rank_resumes_from_its_checkpoint(two_processes):
    run_dir, outs = two_processes
    assert sorted(p.name for p in run_dir.iterdir()) == [".metapt-lock", "checkpoints", "metrics.jsonl", "tensorboard"]
    state = RunFolder(run_dir).latest_checkpoint()
    assert state["trainer"]["counters"]["step"] == SAVE_AT and len(state["rng"]) == WORLD  # each process's RNG
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == list(range(1, STEPS + 1))  # by rank 0; the resumed run cut its rows
    for out in outs:
        _assert_states_close(out["resumed"], outs[0]["final"], rtol=0)  # resumed == uninterrupted, on each rank


# ---- the environment -----------------------------------------------------------------------------


def test_without_torchrun_it_is_a_one_process_run():
    ctx = init_distributed(env={})
    assert not ctx.distributed and ctx.is_main and ctx.world_size == 1
    problem = _problem()
    assert ctx.shard(problem) is problem and type(ctx.strategy()) is Strategy
    ctx.check_replicas(None)  # no-ops
    ctx.barrier()


def test_half_set_environment_is_a_clear_error():
    with pytest.raises(DistributedSetupError, match="MASTER_ADDR, MASTER_PORT missing.*torchrun"):
        init_distributed(env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(DistributedSetupError, match="RANK < WORLD_SIZE"):
        init_distributed(env={"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    with pytest.raises(DistributedSetupError, match="nccl' needs CUDA"):
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        init_distributed("nccl", env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def test_sharded_problem_interleaves_batch_indices():
    problem = _problem()
    shards = [ShardedProblem(problem, r, 2) for r in range(2)]
    for i in range(4):
        for r in range(2):
            assert torch.equal(shards[r].pretrain_batch(i), problem.pretrain_batch(2 * i + r))
            assert torch.equal(shards[r].metaval_batch(i)[1], problem.metaval_batch(2 * i + r)[1])
    assert shards[1].num_tasks == problem.num_tasks  # the rest is the base problem's
    with pytest.raises(ValueError, match="rank < world"):
        ShardedProblem(problem, 2, 2)


# ---- the command line under torchrun -------------------------------------------------------------


def test_torchrun_runs_the_molecules_job_data_parallel(tmp_path):
    """`torchrun --nproc_per_node 2 -m metapt run CONFIG`: one run folder, written by rank 0 alone."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "metapt", "run", "molecules-test", "--out", str(out), "--threads", "1", "--debug",
           "--set", "methods=[meta_task_weights]", "--set", "evaluation.seeds=1", "--set", "evaluation.linear_probe=null"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("report:") == 1  # rank 1 prints nothing
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))  # one row per step: rank 0 alone logs
    assert any(r.get("meta_loss") is not None for r in rows)
    state = RunFolder(out).latest_checkpoint()
    assert len(state["rng"]) == 2 and state["phase"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert "meta task weights" in summary["settings"]["b3db"]["scores"]


# ---- the ECG domain: SimCLR under torchrun equals its one-process reference ---------------------

ECG_STEPS = 8
ECG_SCHEDULE = MetaSchedule(interval=2, warmup_steps=2, unroll_steps=1)  # meta-steps at 4, 6, 8


def _ecg_problem():
    from metapt.domains.ecg.augment import WarpConfig
    from metapt.domains.ecg.models import EncoderConfig
    from metapt.domains.ecg.problem import ECGProblemConfig, ECGSimCLRProblem

    g = torch.Generator().manual_seed(5)
    beats = lambda n: torch.randn(n, 1, 64, generator=g, dtype=torch.float64)  # noqa: E731
    labels = lambda n: (torch.rand(n, 1, generator=g) < 0.3).double()  # noqa: E731
    config = ECGProblemConfig(encoder=EncoderConfig(widths=(4, 8), blocks=(1, 1), kernel_size=5, norm="group"),
                              projection_dim=8, warp=WarpConfig(widths=(4,), n_knots=4),
                              pretrain_batch_size=6, finetune_batch_size=6)
    return ECGSimCLRProblem(beats(48), (beats(24), labels(24)), (beats(24), labels(24)), config, dtype=torch.float64)


def _ecg_trainer(problem, base, **kw):
    return MetaPretrainer(
        problem, base.initial_params(0), base.initial_head(), base.initial_metaparams(0),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
        inner_optimizer=sgd(0.1), solver=Neumann(2, 1e-3), schedule=ECG_SCHEDULE, **kw,
    )


def _ecg_worker(rank, port, harness_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = init_distributed(timeout=datetime.timedelta(seconds=60))
    base = _ecg_problem()
    rec = Recorder()
    trainer = _ecg_trainer(ctx.shard(base), base, loggers=[rec], strategy=ctx.strategy(check_every=1))
    trainer.run_until(ECG_STEPS)
    torch.save({"rows": rec.rows, "final": _state(trainer)}, harness_dir / f"ecg{rank}.pt")
    ctx.close()


class _MeanOfShardLosses:
    """PT batch i is the W shard batches; L_PT their mean (NT-Xent does not split over examples, so
    the global loss of a W-process step is the mean of the W per-process losses)."""

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def pretrain_batch(self, i):
        return [self.base.pretrain_batch(i * WORLD + r) for r in range(WORLD)]

    def pretrain_loss(self, params, phi, batch):
        if isinstance(batch, list):
            return sum(self.base.pretrain_loss(params, phi, b) for b in batch) / len(batch)
        return self.base.pretrain_loss(params, phi, batch)  # a shard's batch, in the meta-step

    def finetune_batch(self, i):  # FT losses are means over examples: the concatenated batch
        return tuple(map(torch.cat, zip(*(self.base.finetune_batch(i * WORLD + r) for r in range(WORLD)))))

    def metaval_batch(self, i):
        return tuple(map(torch.cat, zip(*(self.base.metaval_batch(i * WORLD + r) for r in range(WORLD)))))


def test_ecg_two_processes_match_the_one_process_reference(tmp_path):
    mp.start_processes(_ecg_worker, args=(_free_port(), tmp_path), nprocs=WORLD, start_method="spawn", join=True)
    outs = [torch.load(tmp_path / f"ecg{r}.pt", weights_only=False) for r in range(WORLD)]
    base = _ecg_problem()
    rec = Recorder()
    ref = _ecg_trainer(_MeanOfShardLosses(base), base, loggers=[rec],
                       strategy=MeanOverViews([_Shard(base, r) for r in range(WORLD)]))
    ref.run_until(ECG_STEPS)
    meta_rows = [m for _, m in rec.rows if "meta_loss" in m]
    assert len(meta_rows) == 3 and ref.skipped == 0
    assert [s for s, _ in outs[0]["rows"]] == list(range(1, ECG_STEPS + 1))
    for (s, a), (t, b) in zip(outs[0]["rows"], rec.rows):
        assert s == t and a.keys() == b.keys()
        for k in a:
            if k == "inner_curvature":  # the inner-rate cap's λ: the largest of the processes' own, which
                # bounds that of the mean of their losses (the reference's) from above: a cap binds no later
                assert a[k] >= b[k] * (1 - 1e-10) and a[k] * a["inner_lr"] < 1.9, s
                continue
            assert a[k] == pytest.approx(b[k], rel=1e-10, abs=1e-12), (s, k)
    _assert_states_close(outs[0]["final"], _state(ref), rtol=1e-10)
    _assert_states_close(outs[1]["final"], outs[0]["final"], rtol=0)  # replicas bitwise equal
    assert (outs[0]["final"]["metaparams"]["log_magnitude"] != base.initial_metaparams(0)["log_magnitude"]).all()
