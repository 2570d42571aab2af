"""PVC detection on real MIT-BIH records: no pre-training vs SimCLR vs SimCLR + meta-learned warp.

Runs the whole ECG protocol of ``metapt.domains.ecg.job.run_ecg`` (preset ``benchmark``,
sized for a 2-core CPU in about 10-15 minutes) on ../shared/data/mitbih, writes
``benchmarks/results/ecg_auroc.json`` and ``.md`` (with the exact command and the machine),
keeps the full run folder (plots, metrics, learned warp) under ``runs/``, and prints JSON.

    .venv/bin/python benchmarks/ecg_auroc.py
    .venv/bin/python benchmarks/ecg_auroc.py --data /path/to/mitbih --pretrain-steps 3000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from metapt.domains.ecg.job import ECG_PRESETS, markdown_table, resolve_config, run_ecg

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mitbih",
                        help="beat-layout folder (default: ../shared/data/mitbih next to the repository)")
    parser.add_argument("--preset", default="benchmark", choices=ECG_PRESETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds (default 0..4)")
    parser.add_argument("--label-fractions", type=float, nargs="+", default=None)
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is robust on a shared 2-core machine; oversubscribed "
                             "threads there made steps ~15x slower)")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "ecg_auroc",
                        help="run folder with plots, metrics and the learned warp (git-ignored)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ecg_auroc.json")
    args = parser.parse_args(argv)
    if not (args.data / "README.md").is_file() and not any(args.data.glob("*_beats.csv")):
        parser.error(f"no MIT-BIH beat folder at {args.data}; pass --data DIR")

    torch.set_num_threads(args.threads)  # recorded in the result's machine.threads
    started = time.perf_counter()
    summary = run_ecg(args.run_dir, args.data, preset=args.preset, seeds=args.seeds,
                      label_fractions=args.label_fractions, pretrain_steps=args.pretrain_steps)
    config = json.loads((args.run_dir / "config.json").read_text())["config"]
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/ecg_auroc.py", *sys.argv[1:]])
    result = {
        "benchmark": "ecg_auroc",
        "command": command,
        "wall_seconds": time.perf_counter() - started,
        "machine": {**summary["machine"], "cpus": os.cpu_count(), "platform": platform.platform()},
        "run_dir": str(args.run_dir),
        "config": config,
        **{k: summary[k] for k in ("data", "timing", "learned_warp", "methods", "gains")
           if k in summary},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    resolved = resolve_config(args.preset, args.seeds, args.label_fractions, args.pretrain_steps)
    args.out.with_suffix(".md").write_text(markdown_report(result, resolved))
    print(json.dumps(result, indent=2))
    return result


#: How the ``benchmark`` preset's meta-learning settings were chosen (earlier runs of this script,
#: same record split, seeds and PT steps unless noted); kept in the report for honesty.
TUNING_HISTORY = """\
- Run A (1500 PT steps, labelled beats capped at 800 per record, a meta-step every 10 PT steps
  averaging 2 hypergradients, magnitude lr 0.02, no fixed-warp control): meta warp − SimCLR
  +13.9 ± 11.9 / +12.1 ± 17.3 / +19.0 ± 20.2 (full FT 1/10/100 %), −2.1 ± 39.2 / +8.4 ± 18.3 /
  +25.7 ± 14.2 (linear probe); magnitude 0.030 → 0.047. Without a control this cannot say whether
  the gain comes from meta-learning or from having a warp at all.
- Run B (2000 steps, cap 1000, same meta settings, fixed-warp control added; its no_pretrain, simclr
  and fixed-warp rows are bit-identical to the table above): meta warp − SimCLR +2.8 ± 5.2 /
  +8.8 ± 16.8 / +6.6 ± 14.1 (full FT), −17.6 ± 31.9 / −6.1 ± 14.5 / +10.4 ± 11.8 (linear probe);
  meta warp − fixed warp −3.6 ± 5.4 / −6.9 ± 9.3 / −5.1 ± 11.8 (full FT), −7.9 ± 2.2 / −6.4 ± 2.5 /
  +4.5 ± 9.3 (linear probe); the magnitude wandered 0.030 → 0.039 → 0.030.
- Diagnosis (after 300 and 600 PT steps, hypergradients at a fixed θ): over 12-16 different PT
  batches the hypergradients are nearly orthogonal (mean pairwise cosine 0.01) and their log-magnitude
  component has mean/std ≈ ±0.6 with a sign that flipped between step 300 (+5.3e-4) and step 600
  (−5.1e-4). Keeping the PT batch fixed and varying only the FT/MetaFT batches, ‖mean‖/‖std‖ over 12
  samples rose from 0.67 to 1.9: the PT batch's augmentation and warp-noise draws dominate the noise.
  Hence the run above: 4 past PT batches averaged per meta-step, every 20 PT steps (the same cost as
  2 every 10), magnitude lr 0.03.
- Tried and dropped: class-balanced FT/MetaFT batches for the meta-loss (PVCs are ~2 % of beats);
  on the same diagnostic ‖mean‖/‖std‖ over 16 hypergradients fell from 0.61 to 0.06.
"""


def markdown_report(result: dict, resolved) -> str:
    """The Markdown report of a result dict (regenerable from benchmarks/results/ecg_auroc.json)."""
    timing = result["timing"].get("simclr_meta_warp", {})
    groups = result["data"]["groups"]
    group_line = "; ".join(f"{name} {', '.join(g['record_ids'])} ({g['examples']} beats, {g['positives'][0]} PVC)"
                           for name, g in groups.items())
    pt = ", ".join(f"{m} {t['seconds']:.0f} s" for m, t in result["timing"].items())
    return "\n".join([
        "# ECG: PVC detection AUROC on MIT-BIH (benchmarks/ecg_auroc.py)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['processor']}, {result['machine']['cpus']} CPUs, torch "
        f"{result['machine']['torch']}, {result['machine']['threads']} thread(s). "
        f"Wall time {result['wall_seconds'] / 60:.1f} min (pre-training: {pt}).",
        "",
        markdown_table(result, resolved),
        f"Records by group: {group_line}.",
        "",
        f"Meta-step cost: {timing.get('meta_step_cost_ratio', float('nan')):.1f}x a PT step of the warp run "
        f"(measured in the same run; {timing.get('meta_steps', 0)} meta-steps, "
        f"{resolved.meta.schedule.meta_batches} hypergradients each); learned warp magnitude "
        f"{result.get('learned_warp', {}).get('magnitude', float('nan')):.4f} "
        f"(initial {resolved.problem.warp.init_magnitude:.4f}).",
        "",
        "## Tuning history",
        "",
        TUNING_HISTORY,
    ])


if __name__ == "__main__":
    main()
