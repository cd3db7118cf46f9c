"""Checkpoints: the torch-free .pth reader/writer, validation and folding, synthetic presets."""
from __future__ import annotations


def load_source(checkpoint=None, preset: str = "tiny", deepembed: bool = False, seed: int = 0):
    """Weights from a .pth file, or (no checkpoint) from a built-in synthetic preset."""
    from rwkv_opt.artifact import SourceRef
    from rwkv_opt.checkpoint.synth import synthetic_state_dict
    from rwkv_opt.checkpoint.weights import from_state_dict, load_weights

    if checkpoint is not None:
        return load_weights(checkpoint)
    sd = synthetic_state_dict(preset, deepembed=deepembed, seed=seed)
    name = SourceRef.synthetic_name(preset, deepembed, seed)
    return from_state_dict(sd, source=name, digest=name)
