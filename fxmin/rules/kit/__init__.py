"""The helpers several rule families share. Rules import :mod:`fxmin.rules.api`, this kit and the
base modules (errors, facts, units, graph_helpers, edits), never each other.

- :mod:`.elementwise`: opaque forward/backward, the unary pointwise forward and
  :func:`register_pointwise`, in-place checks, the binary op table;
- :mod:`.costs`: the ``Rule.macs`` counters several families share (NOTE [What is counted]);
- :mod:`.dense`: layers read through a dense (out, in) view of their weights (:func:`layer_rule`);
- :mod:`.views`: shape arguments of views and the sizes they read, uniform heads, channel shuffles;
- :mod:`.products`: products of tensors split into heads, the ``q . k`` scores and the
  ``weights . v`` mix (``matmul``, ``einsum``);
- :mod:`.joins`: tensors joined by ``cat`` / ``stack`` (adopted constants, coupled inputs);
- :mod:`.heads`: repeated heads (NOTE [Grouped heads]): axes inserted by ``x[:, :, None]``, the
  ``repeat_kv`` expand, SDPA with ``enable_gqa``.
"""
from .costs import add_dot_products, dot_products, no_cost, per_input, per_output
from .dense import (DenseView, dense_input, dense_macs, dense_output, dense_required_inputs, dense_view, layer_rule,
                    module_shell, new_parameter, new_weights, whole_then_sliced)
from .elementwise import (BINARY_OPS, check_in_place, identity_in_eval, in_place_call, mutates, opaque_backward,
                          opaque_forward, pointwise_forward, pointwise_macs, register_pointwise, tracked_fact)
from .joins import adopt_missing, coupled_join
from .heads import (expand_heads_backward, expand_heads_forward, expand_heads_plan, grouped_sdpa_backward,
                    grouped_sdpa_forward, index_new_axes_forward, repeat_size_use)
from .products import (first_per_head, head_mask, heads_on, mix_backward, mix_forward, qk_required, scores_backward,
                       scores_forward, softmax_weights)
from .views import (coupled_size, entry_node, entry_where, may_change, merge_order, new_radix, product_closure,
                    size_use_kinds, uniform_digits, view_entries)

__all__ = [
    "BINARY_OPS", "DenseView", "add_dot_products", "adopt_missing", "check_in_place", "coupled_join", "coupled_size", "dense_input", "dense_macs",
    "dense_output", "dot_products", "no_cost", "per_input", "per_output", "pointwise_macs",
    "dense_required_inputs", "dense_view", "entry_node", "entry_where", "expand_heads_backward", "expand_heads_forward",
    "expand_heads_plan", "grouped_sdpa_backward", "grouped_sdpa_forward", "identity_in_eval", "in_place_call",
    "index_new_axes_forward", "layer_rule", "may_change", "merge_order", "module_shell", "mutates", "new_parameter", "new_radix",
    "new_weights", "opaque_backward", "opaque_forward", "pointwise_forward", "product_closure", "size_use_kinds",
    "register_pointwise", "repeat_size_use", "tracked_fact", "uniform_digits", "view_entries", "first_per_head",
    "head_mask", "heads_on", "mix_backward", "mix_forward", "qk_required", "scores_backward", "scores_forward",
    "softmax_weights", "adopt_missing", "coupled_join", "whole_then_sliced",
]
