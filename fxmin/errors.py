"""The exceptions fxmin raises. All derive from :class:`FxminError`."""
from __future__ import annotations


class FxminError(Exception):
    """Base class of every error fxmin raises on purpose."""


class MaskError(FxminError, ValueError):
    """A mask names an unknown parameter, has the wrong shape, or is not boolean/0-1."""


class InputError(FxminError, ValueError):
    """Example inputs are missing, cannot be inferred, or do not run through the model."""


class TraceError(FxminError):
    """``torch.fx`` could not trace the model."""


class MissingRuleError(FxminError):
    """A graph node calls an op fxmin has no rule for.

    fxmin never guesses what an op does. Either register a rule for it
    (see ``fxmin.rules``) or pass ``barriers=[...]`` to keep every channel around it.
    """

    def __init__(self, message: str, node_name: str | None = None):
        super().__init__(message)
        self.node_name = node_name


class EquivalenceError(FxminError):
    """The minimized module does not compute the reference function.

    ``node`` names the first node (in graph order) whose kept channels diverge,
    ``report`` holds the comparison that failed.
    """

    def __init__(self, message: str, node: str | None = None, report=None):
        super().__init__(message)
        self.node = node
        self.report = report


def describe_node(node, root=None) -> str:
    """One line naming a node: its name, op, target, module path and type, source line."""
    parts = [f"node '{node.name}' ({node.op} {_target_name(node.target)})"]
    if node.op == "call_module" and root is not None:
        try:
            module = root.get_submodule(node.target)
            parts.append(f"module '{node.target}' of type {type(module).__module__}.{type(module).__qualname__}")
        except AttributeError:
            pass
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
        # The last 'File ..., line N' pair is the user's source line.
        for index in range(len(lines) - 1, -1, -1):
            if lines[index].startswith("File "):
                code = lines[index + 1] if index + 1 < len(lines) else ""
                parts.append(f"at {lines[index]}: {code}")
                break
    return ", ".join(parts)


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module else name
