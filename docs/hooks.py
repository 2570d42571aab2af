"""MkDocs hooks: pages that cannot go stale, because they are filled in at build time.

* ``<!-- example: PATH -->`` becomes a code block holding the file PATH (relative to the
  repository root), so the examples page shows exactly the scripts the tests run.
* ``<!-- metapt-cli -->`` becomes the ``--help`` text of ``metapt`` and of every one of its
  commands, taken from the installed CLI itself.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = re.compile(r"<!-- example: (?P<path>[\w./-]+) -->")


def _example(match: re.Match) -> str:
    path = ROOT / match["path"]
    if not path.is_file():
        raise FileNotFoundError(f"docs: the page includes {match['path']}, which does not exist")
    return f"```python\n{path.read_text().rstrip()}\n```"


def cli_help() -> dict[str, str]:
    """``--help`` of ``metapt`` (key ``""``) and of each command (key: its name), as printed."""
    import click
    import typer

    from metapt.cli import app

    group = typer.main.get_command(app)
    out = {}
    with click.Context(group, info_name="metapt", terminal_width=100, max_content_width=100) as ctx:
        out[""] = group.get_help(ctx)
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            with click.Context(command, parent=ctx, info_name=name, terminal_width=100,
                               max_content_width=100) as sub:
                out[name] = command.get_help(sub)
    return out


def _cli_page() -> str:
    parts = []
    for name, text in cli_help().items():
        title = "metapt" if not name else f"metapt {name}"
        parts.append(f"### `{title}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = EXAMPLE.sub(_example, markdown)
    if "<!-- metapt-cli -->" in markdown:
        markdown = markdown.replace("<!-- metapt-cli -->", _cli_page())
    return markdown
