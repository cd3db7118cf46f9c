"""rwkv-opt: build, optimize, quantize and benchmark RWKV-7 models for ONNX Runtime."""

__version__ = "0.1.0"
