"""fxmin: exact minimization of pruned PyTorch models.

>>> import fxmin
>>> result = fxmin.minimize(model, masks, example_inputs=(x,))  # doctest: +SKIP

The pass is at the top of the package (``trace``, ``masks``, ``analysis``, ``plan``, ``rewrite``,
``verify``, ``minimize``, ``report``); per-op knowledge is in ``rules``; ``compensated`` holds the
CompensatedLayerNorm family, ``cycle`` the Squeeze-Release cycle, ``audit`` the dependency graph and
MAC counts; ``compile`` and ``cli`` integrate; ``zoo`` holds pure-torch model definitions.
"""
from .analysis import Analysis, analyze_graph
from .audit import DependencyGraph, FlopReport, dependency_graph, flops, mac_costs
from .compile import backend, minimize_exported
from .compensated import CompensatedLayerNorm, compensate
from .cycle import (MacScaled, ReleaseResult, SqueezeReleaseResult, TrainStep, global_magnitude, group_lasso, hold_masks,
                    layer_magnitude, magnitude, prunable, release, squeeze_release, unit_scaled_magnitude)
from .cycle import (CheckpointSettings, FinishSettings, PruneSettings, ReleaseSettings, SqueezeReleaseSettings,
                    StopSettings)
from .cycle import criteria as prune  # the 0.1.0 module name of the pruning criteria
from .errors import EquivalenceError, FxminError, InputError, MaskError, MissingRuleError, TraceError
from .masks import masked_reference, prune_masks
from .minimize import MinimizeResult, minimize
from .plan import Plan, make_plan
from .report import Report, count_parameters
from .rewrite import rewrite
from .rules import REGISTRY, Rule, register_pointwise, rule
from .trace import trace
from .verify import VerifyReport, full_precision, verify
from . import legacy_modules

#: the 0.1.0 name of :func:`dependency_graph` (it read as the pass's own analysis, ``analyze_graph``)
analyze = dependency_graph
legacy_modules.install()

__all__ = [
    "Analysis", "CompensatedLayerNorm", "EquivalenceError", "FxminError", "InputError", "MaskError", "MinimizeResult", "MissingRuleError",
    "Plan", "REGISTRY", "Report", "Rule", "TraceError", "VerifyReport", "analyze_graph", "compensate", "count_parameters",
    "make_plan", "masked_reference", "minimize", "prune_masks", "register_pointwise", "rewrite", "rule", "trace",
    "verify", "full_precision",
    # Squeeze-Release (fxmin/cycle/)
    "MacScaled", "ReleaseResult", "SqueezeReleaseResult", "TrainStep", "global_magnitude", "group_lasso", "hold_masks",
    "layer_magnitude", "magnitude", "prunable", "prune", "release", "squeeze_release", "unit_scaled_magnitude",
    "CheckpointSettings", "FinishSettings", "PruneSettings", "ReleaseSettings", "SqueezeReleaseSettings", "StopSettings",
    # audit (fxmin/audit/) and compiler integration (fxmin/compile.py)
    "DependencyGraph", "FlopReport", "analyze", "backend", "dependency_graph", "flops", "mac_costs", "minimize_exported",
]
__version__ = "0.1.0"
