"""Families of meta-parameters φ: how a raw tensor becomes a pre-training hyperparameter."""

from .weights import weight_logits, weights_from_logits

__all__ = ["weight_logits", "weights_from_logits"]
