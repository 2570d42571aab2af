"""A griffe extension: Sphinx roles in docstrings (``:class:`~metapt.X` ``) become inline code.

metapt's docstrings name other objects the Sphinx way; MkDocs would print the role itself
(":class:"). This turns ``:role:`target` `` into `` `target` `` and ``:role:`~a.b.C` `` into
`` `C` ``, leaving everything else alone.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
