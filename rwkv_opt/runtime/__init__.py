"""ONNX Runtime sessions over rwkv-opt artifacts: state handling, chunked prefill, decode."""

from rwkv_opt.runtime.session import Session, available_providers

__all__ = ["Session", "available_providers"]
