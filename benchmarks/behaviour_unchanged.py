"""Same numbers before and after a restructuring: the same runs on the code at --base and at HEAD.

    .venv/bin/python benchmarks/behaviour_unchanged.py --base d2488f9 [--data ../shared/data/mitbih]

Checks out --base into a temporary git worktree, runs each configuration below with
``python -m metapt run`` on both trees (one thread, a fresh run folder each), and compares every
row of metrics.jsonl (timings left out, and the keys only one side logs, listed) and the
summary's scores, paired gains and learned φ, exactly. Writes
benchmarks/results/behaviour_unchanged.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import ROOT, provenance, write

MOLECULES = ["--set", "pretrain.steps=300", "--set", "pretrain.seeds=1", "--set", "evaluation.seeds=1",
             "--set", "methods=[uniform, meta_task_weights, meta_example_weights, meta_label_noise]"]
RUNS = {
    "synthetic": ["synthetic"],
    "molecules-test": ["molecules-test"],
    "ecg-quick": ["ecg-quick", "--data", "{data}"],
    "molecules, 300 PT steps, 4 learned and frozen φ": ["molecules", *MOLECULES],
    "molecules, accumulated estimator every 2nd step + polyak + normalized": [
        "molecules", *MOLECULES, "--set", "meta.solver.kind=accumulated", "--set", "meta.solver.every=2",
        "--set", "meta.average=polyak", "--set", "meta.normalize_weights=true"],
}
TIMING = ("second", "time")


def run(src: Path, args: list[str], out: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(src)}
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.run([sys.executable, "-m", "metapt", "run", *args, "--out", str(out), "--threads", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out.parent).returncode


def compare(a: Path, b: Path) -> dict:
    rows = [[json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    keys = [sorted({k for r in side for k in r}) for side in rows]
    only = {"base": sorted(set(keys[0]) - set(keys[1])), "head": sorted(set(keys[1]) - set(keys[0]))}
    common = (set(keys[0]) & set(keys[1])) - {k for k in keys[0] + keys[1] if any(t in k for t in TIMING)}
    trim = [[{k: v for k, v in r.items() if k in common} for r in side] for side in rows]
    differ = sum(x != y for x, y in zip(*trim)) + abs(len(trim[0]) - len(trim[1]))
    sums = [json.loads((p / "summary.json").read_text())["settings"] for p in (a, b)]
    parts = ("scores", "gains", "learned")
    same = {part: all(sums[0][s][part] == sums[1][s][part] for s in sums[0]) and sums[0].keys() == sums[1].keys()
            for part in parts}
    return {"metrics_rows": [len(trim[0]), len(trim[1])], "rows_differing": differ, "keys_only_in": only,
            "summary_identical": same, "identical": differ == 0 and all(same.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the commit before the restructuring")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mitbih",
                    help="the MIT-BIH folder the ECG run reads")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    if not args.data.is_dir():
        ap.error(f"no ECG data folder at {args.data}; pass --data DIR")
    source = provenance(args.allow_dirty)
    base = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), base], cwd=ROOT, check=True, capture_output=True)
        try:
            for i, (name, argv) in enumerate(RUNS.items()):
                argv = [a.format(data=args.data.resolve()) for a in argv]
                outs = {side: Path(tmp) / f"{side}{i}" for side in ("base", "head")}
                codes = {side: run(src, argv, outs[side]) for side, src in (("base", tree / "src"), ("head", ROOT / "src"))}
                results[name] = {"args": argv, "exit_codes": codes,
                                 **(compare(outs["base"], outs["head"]) if not any(codes.values()) else {"identical": False})}
                print(f"{name}: identical {results[name]['identical']}", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    result = {**source, "base": base, "runs": results}
    lines = [f"# Same numbers at {base[:7]} and {source['commit'][:7]}", "",
             "Each run on both trees; every metrics.jsonl row compared on the keys both log (timings left out), and "
             "the summary's scores, paired gains and learned φ compared exactly.", "",
             "| run | metrics rows (base / head) | rows differing | summary identical | keys only one side logs |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        if "metrics_rows" not in r:
            lines.append(f"| {name} | failed: exit codes {r['exit_codes']} | | | |")
            continue
        only = "; ".join(f"{side}: {', '.join(k)}" for side, k in r["keys_only_in"].items() if k) or "none"
        lines.append(f"| {name} | {r['metrics_rows'][0]} / {r['metrics_rows'][1]} | {r['rows_differing']} | "
                     f"{'yes' if all(r['summary_identical'].values()) else r['summary_identical']} | {only} |")
    lines += ["", f"Command: `{source['command']}` at commit {source['commit']}.", ""]
    write("behaviour_unchanged", result, "\n".join(lines))


if __name__ == "__main__":
    main()
