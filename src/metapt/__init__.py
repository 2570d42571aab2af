"""metapt: meta-learn the hyperparameters of pre-training by gradient."""

from .problem import EpochShuffler, MetaProblem
from .trainer import MetaPretrainer, MetaSchedule, MetricsLogger, NonFiniteLossError

__version__ = "0.1.0"

__all__ = ["EpochShuffler", "MetaPretrainer", "MetaProblem", "MetaSchedule", "MetricsLogger", "NonFiniteLossError"]
