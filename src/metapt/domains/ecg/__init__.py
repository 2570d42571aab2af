"""ECG domain (Raghu et al. 2021): WFDB data, a 1-D ResNet, SimCLR and the learned warp."""

from metapt.domains.ecg.augment import (
    LearnedWarp,
    WarpConfig,
    default_augment,
    interp1d,
    warp_signal,
)
from metapt.domains.ecg.data import (
    SUPERCLASSES,
    ECGDataError,
    ECGDataset,
    detect_layout,
    load_beat_folder,
    load_ecg_folder,
    load_ptbxl,
    parse_scp_codes,
    read_wfdb_record,
    superclass_labels,
    superclass_map,
)
from metapt.domains.ecg.losses import nt_xent
from metapt.domains.ecg.models import (
    BasicBlock1d,
    ClassifierHead,
    EncoderConfig,
    ProjectionHead,
    ResNet1dEncoder,
    count_parameters,
)
from metapt.domains.ecg.splits import RecordSplit, ptbxl_fold_indices, split_dataset, split_records

__all__ = [
    "SUPERCLASSES", "BasicBlock1d", "ClassifierHead", "ECGDataError", "ECGDataset",
    "EncoderConfig", "LearnedWarp", "ProjectionHead", "RecordSplit", "ResNet1dEncoder",
    "WarpConfig", "count_parameters", "default_augment", "detect_layout", "interp1d",
    "load_beat_folder", "load_ecg_folder", "load_ptbxl", "nt_xent", "parse_scp_codes",
    "ptbxl_fold_indices", "read_wfdb_record", "split_dataset", "split_records",
    "superclass_labels", "superclass_map", "warp_signal",
]
