"""Graph passes, one per module; rwkv_opt.passes.experimental holds the ones no target uses.

Passes register when their module is imported; `get_pass(name)` imports them on first lookup, so
importing one pass (the runtime imports sampling_head) does not import the others.
"""

from rwkv_opt.passes.base import REGISTRY, Pass, PassConfig, PassRefused, PassResult, get_pass, register

__all__ = ["REGISTRY", "Pass", "PassConfig", "PassRefused", "PassResult", "get_pass", "register"]
