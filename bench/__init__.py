"""Benchmarks against peers (transformers, llama.cpp, TRL); not part of the installed package.

Run from the repository root, e.g. `python -m bench.engine --quick`, or through `nanoseek bench`.
"""
