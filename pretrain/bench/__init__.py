"""`python -m pretrain bench`: training and inference speed of every architecture against its
baseline of the same dimensions, on one GPU, side by side in one command (docs/benchmarks.md).

    timing.py   CUDA-event timing and the framework's training step (DeepSpeed ZeRO-1, bf16)
    worker.py   one measurement in a fresh process (a DeepSpeed engine is never fully released
                inside one, so the next configuration's peak memory would include its leftovers)
    llama.py    the LLaMA suite: the baseline's speed levers one by one, 125M/350M/1.3B, HF reference
    suites.py   the suite registry; the architecture suites run the launch/device harnesses
    report.py   the JSON for tracking and the table in docs/benchmarks.md
    cli.py      argument handling
    multigpu.py `--suite multigpu --gpus N`: correctness, scaling and resume on a TP x PP x DP grid
    grid.py     one grid run under torchrun: the trainer's step on layout-independent global batches
"""
