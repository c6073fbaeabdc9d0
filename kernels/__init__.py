"""Triton kernels, each beside its plain-torch reference (the only package that imports Triton).

- `decode_attention.py`: split-KV attention of one decode step over ragged, preallocated KV caches
  (lengths read on the device, so the step can be replayed as a CUDA graph).
- `bitlinear.py`: BitLinear's fused RMSNorm + int8 activation quantization (forward) and the
  norm's straight-through backward that recomputes instead of storing; ternary weight codes.
- `scan.py`: the MLGRU's element-wise linear recurrence h_t = a_t ⊙ h_{t−1} + b_t, chunked
  parallel scan (forward and backward) for training, one in-place step for decoding.
- `ternary_matmul.py`: 2-bit packed ternary weights (4 per byte) and the int8 × ternary matmul
  with int32 accumulation (decode GEMV and prefill GEMM).

`dispatch.py` holds what they share: the choice between kernel and reference (`use_triton`) and the
GPU's SM count. Where Triton is missing (a CPU-only install), every entry point falls back to its
reference; the tests run the kernels on the CPU under TRITON_INTERPRET=1.
"""
