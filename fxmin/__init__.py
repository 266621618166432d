"""fxmin: exact minimization of pruned PyTorch models.

>>> import fxmin
>>> result = fxmin.minimize(model, masks, example_inputs=(x,))  # doctest: +SKIP
"""
from .analysis import Analysis, analyze_graph
from .depgraph import DependencyGraph, analyze
from .compile import backend, minimize_exported
from . import prune
from .cycle import SqueezeReleaseResult, TrainStep, squeeze_release
from .flops import FlopReport, flops, mac_costs
from .errors import EquivalenceError, FxminError, InputError, MaskError, MissingRuleError, TraceError
from .masks import masked_reference, prune_masks
from .minimize import MinimizeResult, minimize
from .compensate import compensate
from .nn import CompensatedLayerNorm
from .plan import Plan, make_plan
from .prune import MacScaled, global_magnitude, layer_magnitude, magnitude, prunable, unit_scaled_magnitude
from .training import group_lasso, hold_masks
from .calibrated_release import ReleaseResult, release
from .report import Report, count_parameters
from .rewrite import rewrite
from .rules import REGISTRY, Rule, register_pointwise, rule
from .trace import trace
from .verify import VerifyReport, full_precision, verify

__all__ = [
    "Analysis", "CompensatedLayerNorm", "EquivalenceError", "FxminError", "InputError", "MaskError", "MinimizeResult", "MissingRuleError",
    "Plan", "REGISTRY", "Report", "Rule", "TraceError", "VerifyReport", "analyze_graph", "compensate", "count_parameters",
    "make_plan", "masked_reference", "minimize", "prune_masks", "register_pointwise", "rewrite", "rule", "trace",
    "verify", "full_precision",
    # Squeeze-Release (fxmin/prune.py, fxmin/training.py, fxmin/calibrated_release.py, fxmin/cycle.py,
    # fxmin/cycle_records.py, fxmin/checkpoints.py)
    "MacScaled", "ReleaseResult", "SqueezeReleaseResult", "TrainStep", "global_magnitude", "group_lasso", "hold_masks",
    "layer_magnitude", "magnitude", "prunable", "prune", "release", "squeeze_release", "unit_scaled_magnitude",
    # audit and compiler integration (fxmin/depgraph.py, fxmin/compile.py)
    "DependencyGraph", "analyze", "backend", "minimize_exported",
    # multiply-accumulates per node (fxmin/flops.py)
    "FlopReport", "flops", "mac_costs",
]
__version__ = "0.1.0"
