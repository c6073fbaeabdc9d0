"""ZeRO stages 1/2/3 with DP=2 give the same losses, grad norms and learning rates as DP=1 on the
same global batches (DP=1 accumulates the two halves; DP=2 reduces them across ranks)."""
import json
from pathlib import Path

import pytest

from tests.helpers import worker

WORKER = Path(__file__).with_name("zero_worker.py")


def test_zero_dp2_matches_dp1(tiny_data, tmp_path):
    worker(WORKER, str(tiny_data), str(tmp_path), nproc=1, timeout=400)
    worker(WORKER, str(tiny_data), str(tmp_path), nproc=2, timeout=400)
    dp1 = json.loads((tmp_path / "dp1.json").read_text())
    dp2 = json.loads((tmp_path / "dp2.json").read_text())
    for stage in ("1", "2", "3"):
        a, b = dp1[stage], dp2[stage]
        assert len(a) == len(b) == 4
        for sa, sb in zip(a, b):
            assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-5), stage
            assert sa["grad_norm"] == pytest.approx(sb["grad_norm"], rel=1e-4), stage
            assert sa["lr"] == sb["lr"]
        assert a[-1]["loss"] < a[0]["loss"], f"stage {stage}: loss did not fall"
    # the three stages are one optimizer: identical trajectories at DP=1
    for s in ("2", "3"):
        assert [x["loss"] for x in dp1[s]] == pytest.approx([x["loss"] for x in dp1["1"]], rel=1e-5)
