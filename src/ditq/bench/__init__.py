"""`ditq bench gemm | attention | model | autoquant`: GPU benchmarks that check correctness before they time.
Each sub-module provides ``add_arguments(parser)`` and ``main(args)``."""

from __future__ import annotations

SUITES = {
    "gemm": ("ditq.bench.gemm", "quantized linear vs cuBLAS bf16 / int8 / fp8 at DiT shapes"),
    "attention": ("ditq.bench.attention", "ditq INT8 attention vs SDPA backends"),
    "model": ("ditq.bench.model", "one transformer forward, bf16 vs each format, eager and compiled"),
    "autoquant": ("ditq.bench.autoquant", "ditq.autoquant_ vs each single format: speed and cosine on a full-size model"),
}


def add_arguments(parser) -> None:
    from ..cli import add_subcommands  # the CLI's own helper; imported here, when the CLI is already loaded

    add_subcommands(parser.add_subparsers(dest="suite", required=True, metavar="SUITE"), SUITES, "_suite_main")


def main(args) -> int:
    return args._suite_main(args)
