"""`ditq` command line: one sub-command a module. Each module named in COMMANDS provides
``add_arguments(parser)`` and ``main(args) -> int``; it is imported only when its command runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DitqError

COMMANDS = {
    "demo": ("ditq.demo", "build a small diffusion transformer, convert, verify and compare it"),
    "convert": ("ditq.convert.convert", "convert a checkpoint to an 8-bit format (streaming)"),
    "analyze": ("ditq.analyze", "per-layer report: which format suits which layer, at what error and size"),
    "verify": ("ditq.verify", "check a converted file against its source"),
    "calibrate": ("ditq.convert.calibrate", "capture per-layer activation statistics from real forwards"),
    "bench": ("ditq.bench", "GPU benchmarks: gemm | attention | model"),
}


def add_subcommands(sub, table: dict, main_attr: str) -> None:
    """One sub-parser per entry of ``table`` (name -> (module, help)); the module fills in its arguments and
    its ``main`` lands in ``args.<main_attr>``. A module this build lacks leaves ``args._missing`` set."""
    for name, (module, help_text) in table.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("ditq"):
                p.set_defaults(_missing=module)
                continue
            raise
        mod.add_arguments(p)
        p.set_defaults(**{main_attr: mod.main})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditq", description="8-bit quantization for diffusion transformers")
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), COMMANDS, "_main")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"ditq {args.command}: not available in this build ({args._missing} missing)", file=sys.stderr)
        return 2
    try:
        return int(args._main(args) or 0)
    except DitqError as e:
        print(f"ditq {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ditq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
