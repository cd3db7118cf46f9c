"""Graph passes. Importing this package registers every built-in pass (one per module)."""
import importlib
import pkgutil

from rwkv_opt.passes.base import REGISTRY, Pass, PassConfig, PassRefused, PassResult, get_pass, register

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["REGISTRY", "Pass", "PassConfig", "PassRefused", "PassResult", "get_pass", "register"]
