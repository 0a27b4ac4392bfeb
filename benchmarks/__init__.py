"""Benchmarks of hf_layerfold: exactness, latency (CPU and CUDA), fold time, and the training-side suites.

Run everything with ``python -m benchmarks.run``; see ``benchmarks/README.md``. Importing this package
pulls in nothing beyond the standard library: each benchmark imports torch / timm when it runs.
"""
