"""Triton kernels, each beside its plain-torch reference (the only package that imports Triton).

- `decode_attention.py`: split-KV attention of one decode step over ragged, preallocated KV caches
  (lengths read on the device, so the step can be replayed as a CUDA graph).

Where Triton is missing (a CPU-only install), every entry point falls back to its reference; the
tests run the kernels on the CPU under TRITON_INTERPRET=1.
"""
