"""Progress: periodic log lines with formatted values; silence when disabled."""

from pretrain.progress import Progress, format_duration, human

METRICS = {
    "loss": 3.41234,
    "lr": 6e-4,
    "grad_norm": 0.8412,
    "tokens_per_sec": 12345.0,
    "mem_gib": 1.23,
    "moe_aux": 0.01234,
}


def test_periodic_line_every_log_every_steps(capsys):
    p = Progress(total_steps=30, start_step=0, enabled=True, log_every=10)
    for step in range(1, 31):
        p.update(step, METRICS)
    p.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 10/30", "step 20/30", "step 30/30"]
    fields = lines[0].split(" | ")
    assert fields[1:7] == [
        "loss 3.412",
        "lr 6.0e-04",
        "grad_norm 0.84",
        "12.3k tok/s",
        "mem 1.2 GiB",
        "moe_aux 0.01234",
    ]
    assert fields[7].startswith("eta ")
    assert lines[-1].endswith("eta 0s")  # last step: nothing left


def test_missing_keys_are_skipped_and_resume_offsets(capsys):
    p = Progress(total_steps=300, start_step=115, enabled=True, log_every=10)
    for step in range(116, 121):
        p.update(step, {"loss": 2.5})
    p.log("checkpoint saved")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 120/300 | loss 2.5 | eta ")
    assert out[1] == "checkpoint saved"
    assert len(out) == 2


def test_disabled_prints_nothing(capsys):
    p = Progress(total_steps=20, enabled=False, log_every=1)
    for step in range(1, 21):
        p.update(step, METRICS)
    p.log("hello")
    p.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_formatting_helpers():
    assert human(950) == "950"
    assert human(12_345) == "12.3k"
    assert human(4.5e6) == "4.5M"
    assert format_duration(59) == "59s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3 * 3600 + 120) == "3h02m"
