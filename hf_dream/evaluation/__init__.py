"""Benchmarks: every decoding method side by side, and the reports made from them."""

from .bench import Method, benchmark, build_methods, correctness_failures
from .report import markdown_table, plot, write_reports

__all__ = ["Method", "benchmark", "build_methods", "correctness_failures", "markdown_table", "plot", "write_reports"]
