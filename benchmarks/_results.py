"""Results files that say where they came from: the command, the commit, the machine.

A results file is written only from a clean working tree (so the commit it records is the
code that made it); ``--allow-dirty`` writes one marked ``"dirty": true`` for development. The
scripts import metapt from this tree's own ``src/``: a virtual environment borrowed from another
checkout (an editable install points at *its* ``src/``) would otherwise run that checkout's code
under this tree's commit.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # before the first `import metapt`: this tree's code, whatever the venv holds

import torch  # noqa: E402

import metapt  # noqa: E402
from metapt.config import config_changes, load_config, to_yaml  # noqa: E402
from metapt.jobs import execute  # noqa: E402
from metapt.runs import RunFolder  # noqa: E402
from metapt.schema import jsonable  # noqa: E402  strict JSON: NaN (a CI over one seed, a cost not measured) → null

RESULTS = ROOT / "benchmarks" / "results"


def provenance(allow_dirty: bool = False) -> dict[str, Any]:
    """The command, the commit (refused if the tree has uncommitted changes, unless allowed) and the machine."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    check_imported_tree()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    if dirty and not allow_dirty:
        raise SystemExit("uncommitted changes: commit first, so the results record the code that made them "
                         "(or pass --allow-dirty for a development run, marked as such)")
    return {"command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
            "commit": git("rev-parse", "HEAD"), "dirty": dirty, **preregistration(git),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()}}


def source_commit() -> str:
    """HEAD of this tree, for a script that writes its own record: refused if metapt is imported
    from elsewhere, suffixed ``-dirty`` if the tree has uncommitted changes."""
    check_imported_tree()
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def check_imported_tree(module: Any = metapt) -> None:
    """Refuse to record this tree's commit for code imported from somewhere else."""
    where = Path(module.__file__).resolve()
    if (ROOT / "src").resolve() not in where.parents:
        raise SystemExit(f"this script is in {ROOT} but runs metapt from {where.parent}, so its results would name "
                         f"{ROOT}'s commit for other code: run it with PYTHONPATH={ROOT / 'src'} "
                         "(metapt was imported before benchmarks/_results.py put that first)")


def preregistration(git) -> dict[str, Any]:
    """For a run named ``--tag prereg_*``: the pre-registration's commit and what src/ changed since."""
    args = sys.argv[1:]
    tags = [b for a, b in zip(args, args[1:]) if a == "--tag"] + [a[6:] for a in args if a.startswith("--tag=")]
    if not any(t.startswith("prereg") for t in tags):
        return {}
    commit = git("log", "-1", "--format=%H", "--", "benchmarks/preregistration.md")
    return {"preregistration_commit": commit,
            "src_changes_since_preregistration": git("diff", "--stat", f"{commit}..HEAD", "--", "src")}


def run_or_reuse(path: Path, config: Any, commit: str) -> dict[str, Any]:
    """The summary of ``config`` in ``path``: reused if finished with this config, resumed if interrupted.

    A new run notes ``commit`` in the folder (``made_at_commit``), so a table built from reused runs
    can say which code made each of them. Work is never thrown away on the user's behalf: a folder
    that holds checkpoints of another config, or an unfinished run of another commit, is refused
    with what differs; only a folder with nothing computed in it is replaced."""
    text = to_yaml(config)
    if not (path / "config.yaml").is_file():
        return _new_run(path, text, config, commit)
    # compared key by key: a folder written before meta.solver became meta.estimator is the same config
    changed = config_changes((path / "config.yaml").read_text(), text)
    if not changed and (path / "summary.json").is_file():
        print(f"reusing the finished run in {path} (made at {made_at(path) or 'an unrecorded commit'})", file=sys.stderr)
        return json.loads((path / "summary.json").read_text())
    folder = RunFolder.open(path)
    if not folder.checkpoints():
        print(f"replacing {path}: it holds no checkpoint"
              + (f" (its config differs in {', '.join(changed)})" if changed else ""), file=sys.stderr)
        return _new_run(path, text, config, commit)
    if changed:
        raise SystemExit(f"{path} holds checkpoints of another config (it differs in {', '.join(changed)}); "
                         f"nothing was changed: move it away or remove it yourself, or use another --tag")
    if made_at(path) not in (None, commit):
        raise SystemExit(f"{path} holds an unfinished run made at commit {made_at(path)}, and this is {commit}: "
                         "resuming would mix two versions of the code in one run. Resume it from a worktree at "
                         "that commit, or move the folder away to start again")
    print(f"resuming the run in {path} from its newest checkpoint", file=sys.stderr)
    return execute(folder, load_config(folder.config_file), resume=True)


def _new_run(path: Path, text: str, config: Any, commit: str) -> dict[str, Any]:
    folder = RunFolder.create(path, text, overwrite=True)
    (folder.path / "made_at_commit").write_text(commit + "\n")
    return execute(folder, config)


def made_at(path: Path) -> str | None:
    """The commit that made the run in ``path`` (None for runs made before the note existed)."""
    note = path / "made_at_commit"
    return note.read_text().strip() if note.is_file() else None


def write(name: str, result: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(jsonable(result), indent=2, allow_nan=False) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
