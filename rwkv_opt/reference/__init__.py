"""Numpy references: the RWKV-7(a) forward (the oracle every graph is measured against)."""

from rwkv_opt.reference.model import ReferenceModel, State

__all__ = ["ReferenceModel", "State"]
