"""Self-supervised functional-group ("motif") pre-training tasks, computed with RDKit.

GROVER (Rong et al., NeurIPS 2020) pre-trains on the presence of RDKit's functional-group
fragments; here each of RDKit's 85 ``fr_*`` fragment descriptors (``rdkit.Chem.Fragments``,
the ``fr_*`` entries of ``Descriptors._descList``) becomes one binary task: does the molecule
contain the fragment (count > 0)? The label is ``HasSubstructMatch`` with the descriptor's own
SMARTS pattern, which is exactly ``fr_X(mol) > 0`` (the count is the number of unique matches).

Which fragments become tasks is decided on the pre-training molecules alone
(:func:`motif_tasks`): a fragment is dropped when it is constant or too rare (or too common)
to learn — fewer than ``max(1, ceil(min_fraction · N))`` of the N molecules have it, or fewer
than that lack it — and when its presence column equals an earlier kept fragment's (the same
task twice, e.g. RDKit's ``fr_phos_acid`` and ``fr_phos_ester`` share one pattern).
No downstream molecule or label is read.

Presence matrices are cached like the graphs (:func:`metapt.domains.molecules.featurize_smiles`):
one ``.npz`` per SMILES list, keyed by a hash of the list, :data:`MOTIF_VERSION`, the RDKit
version and the fragment names; ~1 ms per molecule to compute, ~0.05 s to load.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rdkit
import torch
from rdkit import Chem, rdBase
from rdkit.Chem import Fragments

from .featurize import default_cache_dir

__all__ = ["MOTIF_PREFIX", "MOTIF_VERSION", "MotifTasks", "fragment_names", "motif_presence", "motif_tasks"]

#: Bump whenever the labels below change: it is part of the cache key.
MOTIF_VERSION = 1
#: Task names are ``motif:fr_benzene`` etc.
MOTIF_PREFIX = "motif:"


def _fragments() -> list[tuple[str, Chem.Mol]]:
    """(name, SMARTS pattern) of every ``fr_*`` descriptor, in RDKit's order."""
    out = []
    for name, fn in Fragments.fns:
        # RDKit binds the pattern as a default argument: fn(mol, countUnique=True, pattern=patt)
        pattern = (fn.__defaults__ or (None,))[-1]
        if not isinstance(pattern, Chem.Mol):
            raise RuntimeError(f"RDKit's fragment descriptor {name} has no SMARTS pattern; this RDKit is not supported")
        out.append((name, pattern))
    return out


def fragment_names() -> list[str]:
    """The names of RDKit's ``fr_*`` fragment descriptors (85 in RDKit 2023-2026)."""
    return [name for name, _ in _fragments()]


def _cache_key(smiles: Sequence[str], names: Sequence[str]) -> str:
    h = hashlib.sha256(f"metapt-motifs-v{MOTIF_VERSION}\0rdkit {rdkit.__version__}\0{','.join(names)}\0"
                       f"{len(smiles)}".encode())
    for s in smiles:
        h.update(b"\0")
        h.update(str(s).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _compute(smiles: Sequence[str], fragments: list[tuple[str, Chem.Mol]]) -> np.ndarray:
    presence = np.zeros((len(smiles), len(fragments)), dtype=bool)
    for i, s in enumerate(smiles):
        with rdBase.BlockLogs():
            mol = Chem.MolFromSmiles(s) if isinstance(s, str) and s.strip() else None
        if mol is None or mol.GetNumAtoms() == 0:
            raise ValueError(f"invalid SMILES {s!r} at position {i}: motif labels need molecules RDKit can parse "
                             "(pass the featurised ones, e.g. MoleculeGraphs.index's)")
        presence[i] = [mol.HasSubstructMatch(p) for _, p in fragments]
    return presence


def motif_presence(
    smiles: Sequence[str],
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, list[str], bool]:
    """``(presence bool [N, F], fragment names [F], from_cache)`` for valid SMILES, cached.

    ``presence[i, f]`` is ``fr_f(mol_i) > 0``. Deterministic: the same SMILES list gives the same
    matrix (from the cache or not). Invalid SMILES raise ``ValueError``.
    """
    if isinstance(smiles, str):
        raise ValueError("smiles must be a sequence of SMILES strings, not one string; wrap it in a list")
    smiles = list(smiles)
    fragments = _fragments()
    names = [n for n, _ in fragments]
    key = _cache_key(smiles, names)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"motifs-{key[:24]}.npz"
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as npz:
                stored_key, presence = str(npz["key"]), npz["presence"]
            if stored_key == key and presence.shape == (len(smiles), len(names)) and presence.dtype == bool:
                return presence, names, True
            raise ValueError("cache key or shape mismatch")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            warnings.warn(f"motif cache {path} is unreadable ({err}); rebuilding it", stacklevel=2)
    presence = _compute(smiles, fragments)
    if cache:
        try:  # atomically: readers never see half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, key=np.array(key), presence=presence)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as err:
            warnings.warn(f"could not write motif cache {path} ({err}); continuing without it", stacklevel=2)
    return presence, names, False


@dataclass(frozen=True)
class MotifTasks:
    """The motif tasks of one set of pre-training molecules.

    Attributes:
        labels: float32 ``[N, K]``, 1 = the molecule has the fragment, 0 = it has not (never NaN).
        names: the K task names, ``motif:fr_benzene`` etc.
        dropped: every fragment not made a task → why (``"constant"``, ``"rare: 3 of 300 molecules
            have it (min 3)"``, ``"duplicate of fr_phos_acid"``).
        min_count: the least number of molecules that must have (and lack) a fragment.
        seconds, from_cache: how long the presence matrix took, and whether it came from the cache.
    """

    labels: torch.Tensor
    names: list[str]
    dropped: dict[str, str] = field(default_factory=dict)
    min_count: int = 1
    seconds: float = 0.0
    from_cache: bool = False

    def summary(self) -> dict:
        return {"kept": len(self.names), "dropped": dict(self.dropped), "min_count": self.min_count,
                "seconds": round(self.seconds, 2), "from_cache": self.from_cache}


def motif_tasks(
    smiles: Sequence[str],
    min_fraction: float = 0.01,
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MotifTasks:
    """Motif tasks of the pre-training molecules ``smiles``: RDKit ``fr_*`` presence, filtered.

    A fragment is kept when at least ``max(1, ceil(min_fraction · N))`` molecules have it and at
    least as many lack it (so constant fragments always go), and its column differs from every
    earlier kept one. Only ``smiles`` is read: pass the pre-training molecules, never the
    downstream ones.
    """
    if not 0 < min_fraction < 0.5:
        raise ValueError(f"min_fraction must be in (0, 0.5), got {min_fraction}")
    start = time.perf_counter()
    presence, names, from_cache = motif_presence(smiles, cache=cache, cache_dir=cache_dir)
    n = presence.shape[0]
    min_count = max(1, math.ceil(min_fraction * n))
    counts = presence.sum(axis=0)
    kept: list[int] = []
    seen: dict[bytes, str] = {}
    dropped: dict[str, str] = {}
    for j, name in enumerate(names):
        c = int(counts[j])
        if c in (0, n):
            dropped[name] = "constant: " + ("no molecule has it" if c == 0 else "every molecule has it")
        elif c < min_count:
            dropped[name] = f"rare: {c} of {n} molecules have it (min {min_count})"
        elif n - c < min_count:
            dropped[name] = f"common: {n - c} of {n} molecules lack it (min {min_count})"
        else:
            column = np.packbits(presence[:, j]).tobytes()
            if column in seen:
                dropped[name] = f"duplicate of {seen[column]}"
            else:
                seen[column] = name
                kept.append(j)
    labels = torch.from_numpy(presence[:, kept].astype(np.float32)).reshape(n, len(kept))
    return MotifTasks(labels=labels, names=[MOTIF_PREFIX + names[j] for j in kept], dropped=dropped,
                      min_count=min_count, seconds=time.perf_counter() - start, from_cache=from_cache)
