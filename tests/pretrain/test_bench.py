"""`python -m pretrain bench` off the GPU: argument errors, the no-CUDA refusal, the report writer and
the harness plumbing. Timings themselves are GPU-only (docs/benchmarks.md)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from pretrain.__main__ import main
from pretrain.bench import report, suites


def _row(tok, peak, run="r1"):
    return {"tokens_per_s": tok, "step_s": 65536 / tok, "mfu": tok * 1e-5, "peak_gib": peak,
            "micro_batch": 4, "grad_accum": 4, "run": run}


def _llama(levers, run="r1"):
    return {"levers": levers, "sizes": {}, "hf": {}, "best": ["model.fused_kernels=true"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_refuses_without_cuda(capsys):
    assert main(["bench", "--suite", "llama"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_bench_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--suite", "nope"])
    assert e.value.code == 2
    assert main(["bench", "--steps", "0"]) == 2
    assert main(["bench", "--levers", "warp drive"]) == 2
    assert "unknown lever" in capsys.readouterr().err


def test_report_merges_llama_rows_and_takes_ratios_within_one_run(tmp_path):
    path = tmp_path / "latest.json"
    first = {"machine": {"gpu": "G", "date": "d"}, "command": "cmd1",
             "suites": {"llama": _llama({"baseline": _row(100.0, 50.0), "fused": _row(125.0, 40.0)})}}
    report.merge_json(path, first)
    second = {"machine": {"gpu": "G", "date": "d"}, "command": "cmd2",
              "suites": {"llama": _llama({"compile": _row(130.0, 40.0, run="r2")}, run="r2")}}
    data = report.merge_json(path, second)
    assert set(json.loads(path.read_text())["suites"]["llama"]["result"]["levers"]) == {"baseline", "fused", "compile"}
    text = report.render(data)
    assert "cmd1\ncmd2" in text
    fused = next(x for x in text.splitlines() if x.startswith("| fused "))
    assert "1.25× / 0.80×" in fused and "125" in fused
    compiled = next(x for x in text.splitlines() if x.startswith("| compile "))
    assert "GiB |  | r2 |" in compiled  # another run's baseline: no ratio
    failed = report._train_row("x", {"error": "Traceback\nValueError: boom\nnoise"}, None)
    assert "ValueError: boom" in failed


def test_update_doc_replaces_only_the_marked_section(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# T\n\nintro\n\n## Old\n\nkept\n")
    report.update_doc(doc, f"{report.BEGIN}\none\n{report.END}")
    assert doc.read_text().index("one") < doc.read_text().index("## Old")
    report.update_doc(doc, f"{report.BEGIN}\ntwo\n{report.END}")
    text = doc.read_text()
    assert "two" in text and "one" not in text and "kept" in text and text.count(report.BEGIN) == 1


def test_harness_table_and_json_come_back(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text("import json, sys\njson.dump({'x': 1}, open(sys.argv[sys.argv.index('--out') + 1], 'w'))\n"
                      "print('| a | b |')\nprint('noise')\n")
    res = suites.run_harness([str(script)], log=lambda s: None)
    assert res["json"] == {"x": 1} and res["table"] == ["| a | b |"]
    bad = suites.run_harness([str(tmp_path / "missing.py")], log=lambda s: None)
    assert "error" in bad
    assert sys.executable  # the harness runs under this interpreter


def test_grid_batches_do_not_depend_on_the_layout():
    """pretrain/bench/grid.py: the DP ranks' micro-batches of a step, together, are the one-rank
    stream's, in order; the next step's are other tokens."""
    from pretrain.bench.grid import global_batches

    one = global_batches(384, 8, 16, 0, 1, 2)
    ranks = [global_batches(384, 8, 16, r, 2, 2) for r in range(2)]
    for _ in range(3):
        whole = torch.cat([next(one) for _ in range(4)])
        assert torch.equal(torch.cat([next(it) for it in ranks for _ in range(2)]), whole)
        assert whole.shape == (8, 17) and whole.unique().numel() > 100
    assert not torch.equal(next(one), whole[:2])


def test_multigpu_correctness_with_processes_for_gpus(tiny_data, tmp_path):
    """The multi-GPU suite's correctness part on CPU (gloo, two processes for two GPUs): TP=2 and PP=2
    give the one-process losses of the same global batches, step by step, and the section of
    docs/benchmarks.md shows them."""
    from pretrain.bench import multigpu
    from tests.helpers import TINY_CONFIG, tiny_overrides

    extra = [o for o in tiny_overrides(tiny_data, tmp_path) if not o.startswith("dir=")]
    extra += ["model.arch=subllm", "model.structure=TT(TT)TT", "model.init_std=0.1"]
    res = multigpu.run(2, data=str(tiny_data), parts=("correctness",), models={"subllm": TINY_CONFIG}, extra=extra, steps=3,
                       rel_tol=1e-5, timeout=300)
    c = res["correctness"]
    assert "error" not in c["reference"], c["reference"]
    losses = c["reference"]["losses"]
    assert len(set(losses)) == 3  # training moves
    assert [(g["layout"]["tp"], g["layout"]["pp"]) for g in c["grids"]] == [(2, 1), (1, 2)]
    for g in c["grids"]:
        assert g["ok"] and g["losses"] == pytest.approx(losses, rel=1e-5), g
    section = multigpu.render(res, "python -m pretrain bench --suite multigpu --gpus 2", {"gpu": "cpu"})
    assert "| TP=1 x PP=2 x DP=1 | " + " ".join(f"{x:.4f}" for x in losses) in section
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## Other\n")
    report.update_doc(doc, section, markers=(multigpu.BEGIN, multigpu.END))
    report.update_doc(doc, section, markers=(multigpu.BEGIN, multigpu.END))  # replaced, not added twice
    assert doc.read_text().count(multigpu.BEGIN) == 1 and "## Other" in doc.read_text()


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the refusal with fewer than two GPUs")
def test_multigpu_needs_gpus(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the no-CUDA check
    assert main(["bench", "--suite", "multigpu", "--gpus", "8"]) == 2
    assert "needs --gpus N with 1 <= N" in capsys.readouterr().err
