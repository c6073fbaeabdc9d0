"""Moved to pretrain/bench/timing.py (`python -m pretrain bench`); kept so the architecture
harnesses beside this file import it as before."""
from pretrain.bench.timing import bench_train, cuda_time

__all__ = ["bench_train", "cuda_time"]
