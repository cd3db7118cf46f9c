"""Exports of rwkv-opt artifacts for other runtimes (onnxruntime-genai: `rwkv-opt export genai`)."""
