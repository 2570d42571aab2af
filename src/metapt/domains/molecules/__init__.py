"""Molecules domain: ChEMBL multitask pre-training, B3DB fine-tuning, GIN of Hu et al. (2020)."""

from metapt.domains.molecules.data import (
    ACTIVE_THRESHOLD_NM,
    B3DB,
    ChemblPretraining,
    HeldOutSplit,
    held_out_split,
    load_b3db,
    load_chembl_pretraining,
    murcko_scaffold,
    scaffold_split,
    split_targets,
)
from metapt.domains.molecules.featurize import (
    FeaturizationReport,
    MoleculeGraphs,
    default_cache_dir,
    featurize_smiles,
    mol_to_graph,
    smiles_to_graph,
)

__all__ = [
    "ACTIVE_THRESHOLD_NM",
    "B3DB",
    "ChemblPretraining",
    "HeldOutSplit",
    "held_out_split",
    "load_b3db",
    "load_chembl_pretraining",
    "murcko_scaffold",
    "scaffold_split",
    "split_targets",
    "FeaturizationReport",
    "MoleculeGraphs",
    "default_cache_dir",
    "featurize_smiles",
    "mol_to_graph",
    "smiles_to_graph",
]
