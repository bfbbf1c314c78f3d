"""`ditq bench gemm | attention | model`: GPU benchmarks that check correctness before they time.
Each sub-module provides ``add_arguments(parser)`` and ``main(args)``."""

from __future__ import annotations

import importlib

SUITES = {
    "gemm": ("ditq.bench.gemm", "quantized linear vs cuBLAS bf16 / int8 / fp8 at DiT shapes"),
    "attention": ("ditq.bench.attention", "ditq INT8 attention vs SDPA backends"),
    "model": ("ditq.bench.model", "one transformer forward, bf16 vs each format, eager and compiled"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, (module, help_text) in SUITES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("ditq"):
                continue
            raise
        mod.add_arguments(p)
        p.set_defaults(_suite_main=mod.main)


def main(args) -> int:
    return args._suite_main(args)
