"""Triton kernels, each beside its plain-torch reference (the only package that imports Triton).

Empty in the foundation release: the baseline runs on PyTorch's own kernels (SDPA attention,
fused AdamW on GPU). The MatMul-free LM and performance work add the first kernels here.
"""
