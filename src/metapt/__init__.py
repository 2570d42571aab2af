"""metapt: meta-learn the hyperparameters of pre-training by gradient."""

__version__ = "0.1.0"
