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
