"""Benchmarks that print side-by-side ratios (performance claims live here, never in timed unit tests).

Each benchmark module exposes functions returning plain dicts, so `python -m bitmar.bench` can collect them,
and a `main(argv)` for `python -m bitmar.bench.<name>`.
"""
