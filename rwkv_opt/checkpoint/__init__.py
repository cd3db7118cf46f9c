"""Checkpoints: torch-free .pth and .safetensors readers/writers, fla-hub folders (layouts.py), validation
and folding, synthetic presets."""

from __future__ import annotations


def load_source(checkpoint=None, preset: str = "tiny", deepembed: bool = False, seed: int = 0):
    """Weights from a .pth, a .safetensors file or an fla-hub folder, or (no checkpoint) a synthetic preset."""
    from rwkv_opt.artifact import SourceRef
    from rwkv_opt.checkpoint.synth import synthetic_state_dict
    from rwkv_opt.checkpoint.weights import from_state_dict, load_weights

    if checkpoint is not None:
        return load_weights(checkpoint)
    sd = synthetic_state_dict(preset, deepembed=deepembed, seed=seed)
    name = SourceRef.synthetic_name(preset, deepembed, seed)
    return from_state_dict(sd, source=name, digest=name)
