"""Results files that say where they came from: the command, the commit, the machine.

A results file is written only from a clean working tree (so the commit it records is the
code that made it); ``--allow-dirty`` writes one marked ``"dirty": true`` for development.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from metapt.schema import jsonable  # strict JSON: NaN (a CI over one seed, a cost not measured) → null

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def provenance(allow_dirty: bool = False) -> dict[str, Any]:
    """The command, the commit (refused if the tree has uncommitted changes, unless allowed) and the machine."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    if dirty and not allow_dirty:
        raise SystemExit("uncommitted changes: commit first, so the results record the code that made them "
                         "(or pass --allow-dirty for a development run, marked as such)")
    return {"command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
            "commit": git("rev-parse", "HEAD"), "dirty": dirty,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()}}


def write(name: str, result: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
