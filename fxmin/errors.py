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
        # The last 'File ..., line N' pair outside torch itself is the user's source line
        # (recent torch versions append torch.fx's own frames to the recorded stack); an
        # nn.Sequential has none, so fall back to the last frame outside torch.fx.
        frames = [i for i in range(len(lines)) if lines[i].startswith("File ")]
        user = [i for i in frames if not _in_torch(lines[i])] or [i for i in frames if not _in_torch(lines[i], "fx")]
        if user:
            index = user[-1]
            code = lines[index + 1] if index + 1 < len(lines) else ""
            parts.append(f"at {lines[index]}: {code}")
    return ", ".join(parts)


def _in_torch(frame_line: str, *subpackage: str) -> bool:
    import os

    import torch

    root = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), *subpackage) + os.sep
    path = frame_line[len("File "):].split(",", 1)[0].strip().strip('"')
    return os.path.abspath(path).startswith(root)


def _target_name(target) -> str:
    if isinstance(target, str):
        return target
    if type(target).__name__ in ("OpOverload", "OpOverloadPacket"):  # torch.export's ATen ops
        return f"torch.ops.{target}"
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module else name
