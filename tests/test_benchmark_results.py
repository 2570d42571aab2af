"""Every results file in benchmarks/results says where it came from: the command, the commit and
the machine (issue 22). Files written before a field was recorded say so ('unknown (not
recorded)') instead of guessing, and name the commit that first added them."""

import json
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
FILES = sorted(RESULTS.glob("*.json"))


def test_there_are_results_files():
    assert len(FILES) >= 20


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_results_file_records_command_commit_and_machine(path):
    record = json.loads(path.read_text())
    assert isinstance(record, dict), path.name
    assert isinstance(record.get("command"), str) and record["command"].strip(), f"{path.name}: no command"
    commit = record.get("commit")
    assert isinstance(commit, str) and commit, f"{path.name}: no commit"
    if commit.startswith("unknown"):
        assert re.fullmatch(r"[0-9a-f]{40}", record.get("file_first_committed_in", "")), path.name
    else:
        assert re.fullmatch(r"[0-9a-f]{40}", commit), f"{path.name}: commit {commit!r} is not a git hash"
    machine = record.get("machine")
    assert isinstance(machine, dict) and machine, f"{path.name}: no machine"
    assert "platform" in machine or "cpus" in machine, f"{path.name}: the machine says neither platform nor cpus"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.md")), ids=lambda p: p.name)
def test_every_table_has_its_record(path):
    assert path.with_suffix(".json").is_file(), f"{path.name} has no {path.stem}.json recording where it came from"
