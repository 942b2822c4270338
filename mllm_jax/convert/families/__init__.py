"""One module per HF architecture family; importing this package registers them all.

Each module calls ``mllm_jax.convert.hf.register(Family(...))`` at import time.
"""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
