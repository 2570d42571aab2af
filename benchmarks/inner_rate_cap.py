"""Does the inner-rate cap (``meta.inner_lr_cap: auto``) bind on the shipped presets? λ·lr over whole runs.

    .venv/bin/python benchmarks/inner_rate_cap.py [PRESET ...] [--data ../shared/data/mitbih] [--allow-dirty]

For each preset (default: synthetic, molecules-test, ecg-quick, molecules) and each of its
meta-learned methods, runs the pre-training phase exactly as ``metapt run`` builds it (first
pre-training seed, first setting) and records, at every warm-up head step and meta-step, the
curvature λ the cap estimates (largest eigenvalue of the fine-tuning loss's Hessian in the head)
times ``meta.inner_lr``. The cap binds where λ·lr > 1.9; where it never does, the run is the one
it was without the cap, bit for bit (``tests/test_inner_rate_cap.py`` checks that), so the
figures of those presets do not change. Also records the seconds the estimates took, against
the phase's wall time. Writes benchmarks/results/inner_rate_cap.json and .md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from rich.console import Console

from _results import provenance, write
from metapt.config import load_config
from metapt.domains import domain
from metapt.devices import place
from metapt.runner import build_trainer
from metapt.trainer import _INNER_RATE_BOUND, _INNER_RATE_CAP


class _Curvatures:
    """Every step's λ and rate, as the trainer logs them."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    def log(self, step, metrics) -> None:
        kind = "meta-step" if "meta_loss" in metrics else "warm-up"
        if "inner_curvature" in metrics:
            self.rows.append((kind, float(metrics["inner_curvature"]), float(metrics["inner_lr"])))


def measure(preset: str, data_dir: str | None) -> list[dict]:
    overrides = [f"data_dir={data_dir}"] if preset.startswith("ecg") and data_dir else []
    overrides.append("meta.inner_lr_cap=auto")  # measured where it binds, whatever the job's default
    config = load_config(preset, overrides)
    d = domain(config.job)
    setting = d.settings(config)[0]
    data = d.load(config, setting, Console(quiet=True))
    out = []
    for name in config.methods:
        method = d.methods[name]
        if method.phi != "learned" or not method.pretrain:
            continue
        seed = config.pretrain.seed
        built = place(d.pretraining(config, data, method, seed, torch.device("cpu")), torch.device("cpu"))
        trainer = build_trainer(built, config, method, seed)
        record = _Curvatures()
        trainer.loggers.append(record)
        spent = [0.0]
        timed_curvature = trainer._curvature

        def curvature(*args, _f=timed_curvature):
            start = time.perf_counter()
            try:
                return _f(*args)
            finally:
                spent[0] += time.perf_counter() - start

        trainer._curvature = curvature
        start = time.perf_counter()
        trainer.run_until(config.pretrain.steps)
        wall = time.perf_counter() - start
        lr = config.meta.inner_lr
        products = [lam * lr for _, lam, _ in record.rows if math.isfinite(lam)]
        by_kind = {k: [lam * lr for kind, lam, _ in record.rows if kind == k and math.isfinite(lam)]
                   for k in ("warm-up", "meta-step")}
        out.append({
            "preset": preset, "setting": setting, "method": name, "inner_lr": lr,
            "estimates": len(record.rows), "capped": trainer.inner_lr_capped,
            "lambda_lr_max": max(products), "lambda_lr_median": statistics.median(products),
            "lambda_lr_max_warmup": max(by_kind["warm-up"], default=None),
            "lambda_lr_max_meta": max(by_kind["meta-step"], default=None),
            "skipped": trainer.skipped, "rejected_heads": trainer.rejected_heads,
            "seconds_estimating": round(spent[0], 2), "seconds_phase": round(wall, 2),
        })
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["synthetic", "molecules-test", "ecg-quick", "molecules"])
    parser.add_argument("--data", default="../shared/data/mitbih", help="the ECG presets' data folder")
    parser.add_argument("--allow-dirty", action="store_true")
    args = parser.parse_args()
    record = provenance(args.allow_dirty)
    torch.set_num_threads(1)
    rows = [row for preset in args.presets for row in measure(preset, args.data)]
    record["rows"] = rows
    record["cap"] = f"lr becomes {_INNER_RATE_CAP:g}/λ where λ·lr > {_INNER_RATE_BOUND:g}"
    lines = ["# Inner-rate cap on the presets: λ·inner_lr over whole pre-training phases", "",
             f"`{record['command']}` at {record['commit'][:7]}; {record['machine']['platform']}, one torch thread.",
             "", "λ: the largest eigenvalue of the fine-tuning loss's Hessian in the head, estimated (10 Lanczos "
             "products) before every warm-up head step and meta-step, as `meta.inner_lr_cap: auto` does. The cap "
             f"binds where λ·lr > {_INNER_RATE_BOUND:g} (the step then runs at {_INNER_RATE_CAP:g}/λ); a phase "
             "with 0 capped steps ran exactly as without the cap.", "",
             "| preset | method | inner_lr | estimates | λ·lr max (warm-up / meta-steps) | λ·lr median | capped | "
             "estimating / phase (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        warm = "–" if r["lambda_lr_max_warmup"] is None else f"{r['lambda_lr_max_warmup']:.3g}"
        meta = "–" if r["lambda_lr_max_meta"] is None else f"{r['lambda_lr_max_meta']:.3g}"
        lines.append(f"| {r['preset']} | {r['method']} | {r['inner_lr']:g} | {r['estimates']} | {warm} / {meta} | "
                     f"{r['lambda_lr_median']:.3g} | {r['capped']} | {r['seconds_estimating']:.1f} / "
                     f"{r['seconds_phase']:.1f} |")
    write("inner_rate_cap", record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
