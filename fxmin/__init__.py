"""fxmin: exact minimization of pruned PyTorch models.

>>> import fxmin
>>> result = fxmin.minimize(model, masks, example_inputs=(x,))  # doctest: +SKIP
"""
from .analysis import Analysis, analyze_graph
from .errors import EquivalenceError, FxminError, InputError, MaskError, MissingRuleError, TraceError
from .masks import masked_reference, prune_masks
from .minimize import MinimizeResult, minimize
from .plan import Plan, make_plan
from .report import Report, count_parameters
from .rewrite import rewrite
from .rules import REGISTRY, Rule, register_pointwise, rule
from .trace import trace
from .verify import VerifyReport, verify

__all__ = [
    "Analysis", "EquivalenceError", "FxminError", "InputError", "MaskError", "MinimizeResult", "MissingRuleError",
    "Plan", "REGISTRY", "Report", "Rule", "TraceError", "VerifyReport", "analyze_graph", "count_parameters",
    "make_plan", "masked_reference", "minimize", "prune_masks", "register_pointwise", "rewrite", "rule", "trace",
    "verify",
]
__version__ = "0.1.0"
