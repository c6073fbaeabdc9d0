"""The suites `python -m pretrain bench --suite NAME` runs. `llama` is measured here (llama.py);
the architecture suites run their launch/device harnesses, each of which already measures an
architecture against its LLaMA/bf16 baseline of the same dimensions, configuration by configuration
in fresh processes, and prints its markdown table: the report keeps that table and the JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

# suite -> harness command lines (each gets --out FILE)
HARNESSES: dict[str, list[list[str]]] = {
    "subllm": [["launch/device/bench_subllm.py"]],  # train 4k/8k, decode batch 1/16
    "hgrnbit": [["launch/device/bench_matmulfree.py"]],  # fused vs unfused memory, packed decode
    "flextron": [["launch/device/bench_flextron.py"], ["launch/device/bench_flextron.py", "--train"]],
    "griffin": [["launch/device/bench_griffin.py"]],
}
NAMES = ["llama", *HARNESSES]


def run_harness(argv: list[str], log=print) -> dict:
    """One harness in a subprocess: {"command", "json", "table" (its markdown lines)} or {"error"}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        cmd = [sys.executable, *argv, "--out", path]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        res = {"command": " ".join(["python3", *argv])}
        if proc.returncode != 0 or not os.path.exists(path):
            log(f"{res['command']} FAILED")
            return {**res, "error": proc.stdout[-1500:] + proc.stderr[-2500:]}
        with open(path) as f:
            res["json"] = json.load(f)
    res["table"] = [x for x in proc.stdout.splitlines() if x.startswith("|")]
    log("\n".join(res["table"]))
    return res


def run(name: str, *, steps: int, warmup: int, run_id: str = "", log=print, **llama_kw) -> dict:
    if name == "llama":
        from pretrain.bench import llama

        return llama.run(steps=steps, warmup=warmup, run_id=run_id, log=log, **llama_kw)
    return {"harnesses": [run_harness(argv, log) for argv in HARNESSES[name]]}
