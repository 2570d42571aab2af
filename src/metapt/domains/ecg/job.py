"""The ECG domain for the runner: SimCLR on ECG beats with a meta-learned augmentation, PVC detection downstream.

Methods (the same θ₀, batches and default-augmented views for every SimCLR method):

* ``no_pretrain`` -- a randomly initialised encoder;
* ``simclr`` -- SimCLR with the default augmentations only, no warp network at all;
* ``simclr_fixed_warp`` -- SimCLR plus the warp network frozen at its initial φ₀ (the
  control: what a warp does without meta-learning);
* ``simclr_meta_warp`` -- the warp φ meta-learned online (implicit hypergradient through PT).
* ``simclr_meta_noise``, ``simclr_meta_warp_noise`` (opt-in: ``--set 'methods=[simclr,simclr_meta_noise]'``)
  -- a learned noise model: band-limited Gaussian noise, one learned amplitude per frequency band
  (``problem.noise.bands``, ``problem.noise.init_amplitude``; φ rate ``meta.lr_groups.band_noise``),
  added to each view, alone or after the meta-learned warp.

Data (``--data DIR``): a beat-layout folder (MIT-BIH style) or PTB-XL; the records are
split into pre-training, FT-train, MetaFT-validation and test groups; a quarter of
FT-train (``data.valid_fraction``) is set aside as the downstream 'valid' split.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from rich.console import Console

from ...errors import UserError
from ...evaluation import Downstream, EvalConfig, FinetuneConfig
from ...domain import Method, Pretraining
from ...problem import Params
from ...schema import CheckpointConfig, MetaConfig, PretrainConfig, check_device, check_job, schema
from .problem import ECGProblemConfig, ECGSimCLRProblem
from .plots import plot_magnitude, plot_warp_examples
from .splits import DataConfig, carve_valid, data_summary, load_and_split

METHODS = {m.name: m for m in (
    Method("no_pretrain", "no pre-training", pretrain=False, phi="none", variant="plain"),
    Method("simclr", "SimCLR", phi="none", variant="plain"),
    Method("simclr_fixed_warp", "SimCLR + fixed warp", phi="frozen", variant="warp"),
    Method("simclr_meta_warp", "SimCLR + meta warp", variant="warp"),
    # opt-in (--set methods=[...]): the learned band-limited noise model, alone or with the warp
    Method("simclr_meta_noise", "SimCLR + meta noise", variant="noise"),
    Method("simclr_meta_warp_noise", "SimCLR + meta warp + noise", variant="warp_noise"),
    Method("simclr_fixed_noise", "SimCLR + fixed noise", phi="frozen", variant="noise"),  # its frozen-φ₀ control
)}
#: The methods run unless ``methods`` says otherwise (the noise models are opt-in).
DEFAULT_METHODS = ("no_pretrain", "simclr", "simclr_fixed_warp", "simclr_meta_warp")


@schema
class ECGJob:
    """Everything one ECG run does (``metapt config ecg`` prints it resolved).

    ``pretrain.batch_size`` is beats per PT batch and ``pretrain.seed`` seeds θ₀, φ₀, the
    batch order and the augmentation draws (they replace ``problem.pretrain_batch_size``
    and ``problem.seed``, which must be left out).
    """

    job: Literal["ecg"] = "ecg"
    device: str = "auto"
    data_dir: str | None = None
    methods: tuple[Literal[tuple(METHODS)], ...] = Field(default=DEFAULT_METHODS, min_length=1)
    data: DataConfig = DataConfig()
    problem: ECGProblemConfig = ECGProblemConfig()
    pretrain: PretrainConfig = PretrainConfig(steps=2000, lr=1e-3, batch_size=64)
    meta: MetaConfig = MetaConfig(interval=20, unroll_steps=1, batches=4, warmup_steps=150, inner_lr=0.1, lr=1e-3,
                                  lr_groups={"log_magnitude": 0.03, "band_noise": 0.03})
    evaluation: EvalConfig = EvalConfig(
        seeds=5, label_fractions=(0.01, 0.1, 1.0), min_batches_per_epoch=8,
        full_finetune=FinetuneConfig(epochs=10, lr=1e-3, batch_size=64),
        linear_probe=FinetuneConfig(linear_probe=True, epochs=30, lr=1e-2, batch_size=64))
    checkpoint: CheckpointConfig = CheckpointConfig()

    def __post_init__(self) -> None:
        check_device(self.device)
        check_job(self, any(METHODS[m].phi == "learned" for m in self.methods))
        if self.meta.normalize_weights:
            raise ValueError("meta.normalize_weights normalises task or example weights; the ECG job learns an "
                             "augmentation and a noise model, no weights: leave it false")
        default = ECGProblemConfig()
        if (self.problem.pretrain_batch_size, self.problem.seed) != (default.pretrain_batch_size, default.seed):
            raise ValueError("problem.pretrain_batch_size and problem.seed are set by pretrain.batch_size and "
                             "pretrain.seed; leave them out")


class ECG:
    name = "ecg"

    def __init__(self) -> None:
        self._warp_drawn: dict[str, tuple[float, Any, Params]] = {}  # method -> the φ plots() draws the warp of
    methods = METHODS
    gains = (("simclr_meta_warp", "simclr"), ("simclr_meta_warp", "simclr_fixed_warp"),
             ("simclr_meta_noise", "simclr"), ("simclr_meta_noise", "simclr_fixed_noise"),
             ("simclr_fixed_warp", "simclr"), ("simclr", "no_pretrain"))

    def check(self, config: ECGJob) -> None:
        """Before a run folder is made: the data folder is given and exists."""
        if not config.data_dir:
            raise UserError("the ecg job needs a data folder: --data DIR or data_dir in the config "
                            "(a folder of WFDB records, e.g. ../shared/data/mitbih)")
        if not Path(config.data_dir).is_dir():
            raise UserError(f"data folder {config.data_dir} does not exist or is not a folder")

    def settings(self, config: ECGJob) -> tuple[str, ...]:
        return ("ecg",)

    def load(self, config: ECGJob, setting: str, console: Console) -> dict[str, Any]:
        if not config.data_dir:
            raise ValueError("the ecg job needs a data folder: --data DIR or data_dir in the config "
                             "(a folder of WFDB records, e.g. ../shared/data/mitbih)")
        ds, split = load_and_split(Path(config.data_dir), config.data)
        split, valid = carve_valid(ds, split, config.data.valid_fraction, config.data.split_seed)
        summary = data_summary(ds, split, Path(config.data_dir))
        console.print(f"[bold]ECG[/] ({summary['layout']} layout): " + ", ".join(
            f"{k} {g['examples']} beats / {g['records']} records" for k, g in summary["groups"].items())
            + f", valid {len(valid)} beats (from FT-train)")
        summary["groups"]["valid"] = {"examples": int(len(valid)), "from": "ft_train"}
        return {"ds": ds, "split": split, "valid": valid, "summary": summary}

    def pretraining(self, config: ECGJob, data: dict[str, Any], method: Method, seed: int,
                    device: torch.device) -> Pretraining:
        pc = replace(config.problem, use_warp=method.variant in ("warp", "warp_noise"),
                     use_noise=method.variant in ("noise", "warp_noise"), seed=seed,
                     pretrain_batch_size=config.pretrain.batch_size)
        problem = ECGSimCLRProblem.from_dataset(data["ds"], data["split"], pc)
        if device.type != "cpu":
            problem.to(device)
        return Pretraining(problem, problem.initial_params(seed), problem.initial_head(),
                           problem.initial_metaparams(seed), encoder=problem.encoder_module,
                           emb_dim=problem.embedding_dim)

    def downstream(self, config: ECGJob, data: dict[str, Any]) -> Downstream:
        ds, split = data["ds"], data["split"]
        index = {"train": split.ft_train, "valid": data["valid"], "test": split.test}
        tensors = {k: (ds.signals[v], ds.labels[v]) for k, v in index.items()}
        return Downstream(batch=lambda s, idx: (tensors[s][0][idx], tensors[s][1][idx]),
                          labels={k: v[1] for k, v in tensors.items()}, num_tasks=ds.labels.shape[1])

    def data_summary(self, config: ECGJob, data: dict[str, Any]) -> dict[str, Any]:
        return data["summary"]

    def describe(self, config: ECGJob, data: dict[str, Any], method: Method, phi: dict) -> dict[str, Any]:
        problem = self.pretraining(config, data, method, config.pretrain.seed, torch.device("cpu")).problem
        described = dict(problem.describe_metaparams(phi))
        if problem.warp is not None and method.name not in self._warp_drawn:
            # beats and a draw of the warp, for plots(): of the first seed's φ, which the summary lists first
            self._warp_drawn[method.name] = (described["magnitude"], problem, {k: v.detach().cpu() for k, v in phi.items()})
        return described

    def plots(self, out: Path, summary: dict[str, Any]) -> None:
        if (out / "metrics.jsonl").is_file():
            plot_magnitude(out / "metrics.jsonl", out / "warp_magnitude.png")
        drawn, self._warp_drawn = self._warp_drawn, {}
        for method, (magnitude, problem, phi) in drawn.items():
            learned = summary["settings"].get("ecg", {}).get("learned", {}).get(method, {})
            if learned.get("magnitude") == magnitude:  # this run's φ, not one left from another run
                plot_warp_examples(problem, phi, out / ("warp_examples.png" if method == "simclr_meta_warp"
                                                        else f"warp_examples_{method}.png"))


DOMAIN = ECG()
CONFIG = ECGJob
