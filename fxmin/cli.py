"""``fxmin ...`` (also ``python -m fxmin``): a thin shell over the public API.

Exit codes (stable; scripts may rely on them):

==  =====================================================================
0   success
1   verification failed: the outputs differ (``verify``, or ``minimize``
    raising ``EquivalenceError``)
2   usage or input error: bad arguments, unreadable/unsupported model or
    masks file, masks that do not fit, missing example input shape
3   missing rule: an op fxmin has no rule for (pass ``--barrier NAME``)
4   tracing failed (neither torch.fx nor torch.export could trace the model)
5   any other fxmin error
==  =====================================================================

Errors go to stderr as one first line ``fxmin: error[KIND]: message`` with KIND one of
``usage``, ``input``, ``verification``, ``missing-rule``, ``trace``, ``fxmin``; details follow.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn
from tabulate import tabulate

EXIT_OK, EXIT_VERIFY, EXIT_INPUT, EXIT_MISSING_RULE, EXIT_TRACE, EXIT_OTHER = 0, 1, 2, 3, 4, 5


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_INPUT, kind: str = "input"):
        super().__init__(message)
        self.code, self.kind = code, kind


# -- loading -----------------------------------------------------------------------------------------

def _is_exported_program(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("serialized_exported_program" in name or name.endswith(("/archive_format", "/models/model.json"))
                   for name in archive.namelist())


def load_model(spec: str, weights: str | None = None):
    """A module from a ``torch.save`` file, a ``package.module:factory`` path, or an ExportedProgram file.

    Returns ``(model, kind)`` with kind ``"module"`` or ``"exported"``. TorchScript files are refused:
    fxmin reads Python code through torch.fx, and a ScriptModule has none left.
    """
    path = Path(spec)
    if path.is_file():
        if _is_exported_program(path):
            return torch.export.load(str(path)), "exported"
        try:
            with warnings.catch_warnings():  # torch.load of a TorchScript archive warns, then dispatches
                warnings.simplefilter("ignore")
                loaded = torch.load(str(path), weights_only=False, map_location="cpu")
        except Exception as error:
            raise CliError(f"cannot read model file '{spec}': {type(error).__name__}: {error}") from error
        if isinstance(loaded, torch.jit.ScriptModule):
            raise CliError(
                f"'{spec}' is a TorchScript module, which fxmin does not support: torch.fx needs the Python "
                "module. Save the nn.Module itself (torch.save(model, path)), give package.module:factory, "
                "or export it (torch.export.save) and pass the .pt2 file.")
        if isinstance(loaded, dict):
            raise CliError(f"'{spec}' holds a state dict, not a model: pass package.module:factory --weights {spec}")
        if not isinstance(loaded, nn.Module):
            raise CliError(f"'{spec}' holds a {type(loaded).__name__}, not a torch.nn.Module")
        model = loaded
    elif ":" in spec:
        module_name, _, attribute = spec.partition(":")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: factories next to the caller import
        try:
            factory = importlib.import_module(module_name)
            for part in attribute.split("."):
                factory = getattr(factory, part)
        except (ImportError, AttributeError) as error:
            raise CliError(f"cannot import '{spec}': {type(error).__name__}: {error}") from error
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        if not isinstance(model, nn.Module):
            raise CliError(f"'{spec}' gave a {type(model).__name__}, not a torch.nn.Module")
    else:
        raise CliError(f"model '{spec}' is neither an existing file nor a package.module:factory path")
    if weights is not None:
        state = torch.load(weights, weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    return model.eval(), "module"


def load_masks(spec: str | None):
    """``None``/``prune``: read torch.nn.utils.prune masks (else exact zeros); otherwise a torch.save'd dict."""
    if spec is None or spec in ("prune", "zeros"):
        return None
    try:
        masks = torch.load(spec, weights_only=True, map_location="cpu")
    except FileNotFoundError as error:
        raise CliError(f"masks file '{spec}' does not exist") from error
    except Exception as error:
        raise CliError(f"cannot read masks file '{spec}': {type(error).__name__}: {error}") from error
    if not isinstance(masks, dict):
        raise CliError(f"masks file '{spec}' holds a {type(masks).__name__}, not a dict of name -> tensor")
    return masks


def example_inputs(shapes: list | None, dtype: str = "float32"):
    if not shapes:
        return None
    inputs = []
    for text in shapes:
        try:
            shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
        except ValueError as error:
            raise CliError(f"--example-input-shape '{text}' is not a comma-separated list of sizes") from error
        inputs.append(torch.randn(shape, generator=torch.Generator().manual_seed(len(inputs)),
                                  dtype=getattr(torch, dtype)))
    return tuple(inputs)


def _options(args) -> dict:
    return {"barriers": list(args.barrier or [])}


def write_atomically(path, write) -> None:
    """Call ``write(temporary path)`` beside ``path`` and move the file into place (``os.replace``): an
    interrupted or failed write (Ctrl-C, a full disk) leaves ``path`` as it was and no partial file. The
    temporary name keeps ``path``'s suffix, which writers such as networkx read (``.gz``)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # the mode a plain open() would give, not mkstemp's 0600
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# -- commands ---------------------------------------------------------------------------------------------

def cmd_minimize(args) -> int:
    import fxmin

    model, kind = load_model(args.model, args.weights)
    masks = load_masks(args.masks)
    inputs = example_inputs(args.example_input_shape)
    options = dict(_options(args), verify=False if args.no_verify else args.verify)
    if kind == "exported":
        program, result = fxmin.minimize_exported(model, masks, inputs, **options)
        if args.output:
            write_atomically(args.output, lambda path: torch.export.save(program, path))
    else:
        result = fxmin.minimize(model, masks, inputs, frontend=args.frontend, **options)
        if args.output and result.frontend == "export":
            write_atomically(args.output, lambda path: torch.export.save(result.program, path))
        elif args.output:
            write_atomically(args.output, lambda path: torch.save(result.module, path))
    report = result.report
    if args.format == "json":
        verification = report.verification
        errors = {} if verification is None else {str(d).replace("torch.", ""): verification.max_error(d)
                                                   for d in verification.dtypes}
        print(json.dumps({"params_before": report.params_before, "params_after": report.params_after,
                          "compression": report.compression, "max_error_float64": errors.get("float64"),
                          "verified": None if verification is None else verification.level, "max_error": errors,
                          "frontend": result.frontend,
                          "output": args.output, "layers": [list(map(str, row)) for row in report.rows()]}))
    else:
        print(report.table())
        if args.output:
            print(f"wrote {args.output}: parameters {report.params_before} -> {report.params_after}")
    return EXIT_OK


def cmd_audit(args) -> int:
    import fxmin

    model, kind = load_model(args.model, args.weights)
    if kind == "exported":
        raise CliError("audit takes a torch.save'd module or package.module:factory; "
                       "for an ExportedProgram use fxmin.minimize_exported(...).analysis in Python")
    audit = fxmin.dependency_graph(model, load_masks(args.masks), example_inputs(args.example_input_shape), **_options(args))
    if args.explain:
        for item in args.explain:
            name, _, channel = item.rpartition(":")
            if not name or not channel.isdigit():
                raise CliError(f"--explain takes NAME:CHANNEL (e.g. layer1.0.conv1.weight:17), got '{item}'")
            try:
                print(audit.explain(name, int(channel)))
            except (KeyError, IndexError) as error:
                raise CliError(str(error).strip("'\"")) from error
        return EXIT_OK
    if args.format == "graphml":
        if not args.output:
            raise CliError("--format graphml needs -o FILE")
        write_atomically(args.output, audit.to_graphml)
        print(f"wrote {args.output}")
        return EXIT_OK
    text = {"table": audit.table, "json": audit.to_json, "dot": audit.to_dot}[args.format]()
    if args.output:
        write_atomically(args.output, lambda path: Path(path).write_text(text))
        print(f"wrote {args.output}")
    else:
        print(text)
    if args.svg:
        audit.to_svg(args.svg)
        print(f"wrote {args.svg}")
    return EXIT_OK


def cmd_verify(args) -> int:
    import fxmin

    original, kind = load_model(args.original, args.weights)
    minimized, minimized_kind = load_model(args.minimized)
    if kind == "exported":
        original = original.module()
    if minimized_kind == "exported":
        minimized = minimized.module()
    reference, _ = fxmin.masked_reference(original, load_masks(args.masks))
    inputs = example_inputs(args.example_input_shape)
    if inputs is None:
        from .trace import infer_example_inputs, trace

        try:
            inputs = infer_example_inputs(trace(reference))
        except fxmin.FxminError as error:
            raise CliError(f"{error} (on the command line: --example-input-shape 1,3,32,32)") from error
    try:
        report = fxmin.verify(reference, minimized, inputs, trials=args.trials, raise_on_failure=False)
    except Exception as error:  # shapes that do not fit, a module that fails on the inputs
        raise CliError(f"the models did not run on inputs {[tuple(x.shape) for x in inputs]}: "
                       f"{type(error).__name__}: {error}", EXIT_VERIFY, "verification") from error
    rows = [(str(c.dtype).replace("torch.", ""), c.inputs, f"{c.max_error:.3g}", f"{c.tolerance * c.scale:.3g}",
             "ok" if c.ok else "FAIL") for c in report.comparisons]
    print(tabulate(rows, headers=["dtype", "inputs", "max abs error", "allowed", "result"]))
    if not report.ok:
        print("fxmin: error[verification]: the minimized model does not compute the original (masked) model",
              file=sys.stderr)
        return EXIT_VERIFY
    print("verified: equivalent")
    return EXIT_OK


def cmd_rules(args) -> int:
    from . import REGISTRY

    rows = REGISTRY.table()
    if args.format == "json":
        print(json.dumps([{"kind": k, "target": t, "rule": r} for k, t, r in rows], indent=2))
    else:
        print(tabulate(rows, headers=["kind", "target", "rule"]))
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------------

MODEL_HELP = ("a torch.save'd nn.Module file, a package.module:factory path (called with no arguments), "
              "or a torch.export .pt2 file (ExportedProgram; minimize only). TorchScript is not supported.")
MASKS_HELP = "a torch.save'd dict {parameter name: mask}, or 'prune' (torch.nn.utils.prune masks, else exact zeros)"


def _common(parser, masks=True):
    parser.add_argument("--weights", help="a state dict to load into the model (with package.module:factory)")
    if masks:
        parser.add_argument("--masks", default="prune", help=MASKS_HELP + " (default: prune)")
    parser.add_argument("--example-input-shape", action="append", metavar="SHAPE",
                        help="example input shape such as 1,3,32,32 (repeat for several inputs); "
                             "needed unless the model starts with nn.Linear")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxmin", description="Make pruned PyTorch models physically smaller, exactly.",
        epilog="exit codes: 0 ok, 1 verification failed, 2 usage/input error, 3 missing rule, 4 trace failed, "
               "5 other fxmin error", formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("minimize", help="write the minimized model and print what changed",
                            description="Minimize MODEL under MASKS, verify, write OUT (a torch.save'd GraphModule "
                                        "from the torch.fx front end, an ExportedProgram .pt2 from the torch.export "
                                        "front end or when MODEL is one).")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    _common(p)
    p.add_argument("-o", "--output", metavar="OUT", help="where to write the minimized model")
    p.add_argument("--barrier", action="append", metavar="NAME", help="keep every channel around this module/node")
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    p.add_argument("--verify", choices=("full", "quick"), default="full",
                   help="full: float64 and the model's dtype on the example and 2 random input sets (the default); "
                        "quick: the model's dtype on the example inputs and the analysis's constants, for large models")
    p.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                   help="how the model becomes a graph: torch.fx, torch.export, or auto (torch.fx, and torch.export "
                        "when torch.fx cannot trace the model; the default)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="report format on stdout")
    p.set_defaults(run=cmd_minimize)

    p = commands.add_parser("audit", help="channel dependency graph: why each channel stays",
                            description="Analyse MODEL under MASKS without rewriting it.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    _common(p)
    p.add_argument("--barrier", action="append", metavar="NAME", help="keep every channel around this module/node")
    p.add_argument("--format", choices=("table", "json", "graphml", "dot"), default="table")
    p.add_argument("-o", "--output", metavar="FILE", help="write there instead of stdout (required for graphml)")
    p.add_argument("--svg", metavar="FILE", help="also render the graph to SVG (needs graphviz)")
    p.add_argument("--explain", action="append", metavar="NAME:CHANNEL",
                   help="explain one channel, e.g. layer1.0.conv1.weight:17 (repeatable)")
    p.set_defaults(run=cmd_audit)

    p = commands.add_parser("verify", help="check a minimized model against the original",
                            description="Exit 0 if MINIMIZED computes ORIGINAL with MASKS applied, 1 if not.")
    p.add_argument("original", metavar="ORIGINAL", help=MODEL_HELP)
    p.add_argument("minimized", metavar="MINIMIZED", help="the file `fxmin minimize -o` wrote")
    _common(p)
    p.add_argument("--trials", type=int, default=2, help="random input sets besides the example (default 2)")
    p.set_defaults(run=cmd_verify)

    p = commands.add_parser("rules", help="list the ops and modules fxmin has rules for")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=cmd_rules)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    from .errors import EquivalenceError, FxminError, InputError, MaskError, MissingRuleError, TraceError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # argparse: --help (0) or a usage error (2)
        return int(exit.code or 0)
    try:
        return args.run(args)
    except CliError as error:
        code, kind, message = error.code, error.kind, str(error)
    except EquivalenceError as error:
        code, kind, message = EXIT_VERIFY, "verification", str(error)
    except (InputError, MaskError) as error:
        code, kind, message = EXIT_INPUT, "input", str(error)
    except MissingRuleError as error:
        code, kind, message = EXIT_MISSING_RULE, "missing-rule", str(error)
    except TraceError as error:
        code, kind, message = EXIT_TRACE, "trace", str(error)
    except FxminError as error:
        code, kind, message = EXIT_OTHER, "fxmin", str(error)
    except FileNotFoundError as error:
        code, kind, message = EXIT_INPUT, "input", str(error)
    print(f"fxmin: error[{kind}]: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
