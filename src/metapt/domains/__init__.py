"""The domains that ship with metapt, found lazily by job name.

Each domain lives in its own folder; its ``job`` module defines ``DOMAIN`` (a
:class:`metapt.domain.Domain`) and ``CONFIG`` (its pydantic job-config class). Nothing
is imported until a job of that name is asked for, so ``metapt --help`` and
``metapt config --list`` stay fast, and adding a domain is one line here.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: job name -> the module that defines its DOMAIN and CONFIG
REGISTRY: dict[str, str] = {
    "molecules": "metapt.domains.molecules.job",
    "ecg": "metapt.domains.ecg.job",
    "synthetic": "metapt.domains.synthetic.job",
}


def job_names() -> list[str]:
    return list(REGISTRY)


def domain(job: str) -> Any:
    """The :class:`metapt.domain.Domain` of a job name."""
    return import_module(REGISTRY[job]).DOMAIN


def config_class(job: str) -> type:
    """The pydantic configuration class of a job name."""
    return import_module(REGISTRY[job]).CONFIG
