"""Module names of fxmin 0.1.0 that moved into folders, kept importable so that pickles and
checkpoints written by 0.1.0 still load.

NOTE [Legacy module names]
A pickle names each class by the module that defined it (``fxmin.nn.CompensatedLayerNorm``). The
modules now live in folders; registering the old names in ``sys.modules`` lets the unpickler find
them without keeping empty shim files at the top of the package.
"""
from __future__ import annotations

import importlib
import sys

#: old module name -> where it lives now
MOVED = {
    "fxmin.nn": "fxmin.compensated.layer_norm",
    "fxmin.cln_forward": "fxmin.compensated.forward_paths",
    "fxmin.cycle_records": "fxmin.cycle.records",
    "fxmin.checkpoints": "fxmin.cycle.checkpoints",
    "fxmin.calibrated_release": "fxmin.cycle.release",
    "fxmin.prune": "fxmin.cycle.criteria",
    "fxmin.training": "fxmin.cycle.training",
    "fxmin.depgraph": "fxmin.audit.graph",
    "fxmin.exports": "fxmin.audit.exports",
}

#: (old module, class name) -> the module the class lives in now, for classes that left a module
#: that still exists (its old name stays an attribute of that module)
MOVED_CLASSES = {
    ("fxmin.rules.mha", "SlicedMultiheadAttention"): "fxmin.compensated.attention",
}


def install() -> None:
    """Register every old name in ``sys.modules`` and as an attribute of ``fxmin`` where that is free;
    give every old module of :data:`MOVED_CLASSES` its class back."""
    package = sys.modules["fxmin"]
    for old, new in MOVED.items():
        module = sys.modules.setdefault(old, importlib.import_module(new))
        name = old.rpartition(".")[2]
        if not hasattr(package, name):
            setattr(package, name, module)
    for (old, name), new in MOVED_CLASSES.items():
        module = importlib.import_module(old)
        if not hasattr(module, name):
            setattr(module, name, getattr(importlib.import_module(new), name))
