"""The bench's outputs: a JSON for tracking (suites merged into the latest file, so a suite run
alone updates only its part) and the markdown section of docs/benchmarks.md between the markers."""
from __future__ import annotations

import json
from pathlib import Path

BEGIN, END = "<!-- bench:begin (written by python -m pretrain bench) -->", "<!-- bench:end -->"


def merge_json(path: Path, run: dict) -> dict:
    """Suites of `run` replace the same suites in the file; the others stay with their own machine info.
    The llama suite merges row by row (a run of some levers keeps the other rows, each tagged with the
    run it came from), so it can be measured in several device calls of at most 10 minutes."""
    old = json.loads(path.read_text()) if path.exists() else {"suites": {}}
    for name, res in run["suites"].items():
        prev = old["suites"].get(name)
        if name == "llama" and prev is not None:
            for part in ("levers", "sizes", "hf"):
                prev["result"][part] = {**prev["result"].get(part, {}), **res[part]}
            prev["result"]["best"] = res["best"]
            prev["machine"] = run["machine"]
            prev["commands"] = [*prev.get("commands", [prev.get("command")]), run["command"]]
        else:
            old["suites"][name] = {"machine": run["machine"], "commands": [run["command"]], "result": res}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=1) + "\n")
    return old


def _f(r: dict, key: str, fmt: str) -> str:
    return "failed" if "error" in r else format(r[key], fmt)


def _train_row(label: str, r: dict, base: dict | None) -> str:
    if "error" in r:
        lines = r["error"].strip().splitlines() or ["?"]
        why = next((x for x in reversed(lines) if "Error" in x), lines[-1]).replace("|", "/")[-100:]
        return f"| {label} | failed: {why} | | | | | | |"
    ratio = "" if base is None or "error" in base or base.get("run") != r.get("run") else \
        f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}× / {r['peak_gib'] / base['peak_gib']:.2f}×"
    micro = f"{r['micro_batch']} × {r['grad_accum']}"
    return (f"| {label} | {micro} | {r['tokens_per_s']:,.0f} | {r['step_s'] * 1e3:.0f} ms | {r.get('mfu', 0):.1%} | "
            f"{r['peak_gib']:.1f} GiB | {ratio} | {r.get('run', '')} |")


def llama_tables(res: dict) -> list[str]:
    head = ["| configuration | micro-batch × accum | tokens/s | step | MFU | peak memory "
            "| × baseline (tok/s / memory) | run |",
            "|---|---|---|---|---|---|---|---|"]
    lines: list[str] = []
    base = res["levers"].get("baseline")
    if res["levers"]:
        lines += ["**LLaMA-1.3B at seq 4096: each lever against the baseline, same run**", "", *head]
        lines += [_train_row(n, r, None if n == "baseline" else base) for n, r in res["levers"].items()]
        for n, r in res.get("hf", {}).items():
            lines.append(_train_row(n + " (reference)", r, base))
        lines.append("")
    if res["sizes"]:
        lines += ["**Baseline vs optimized (" + " ".join(res["best"]) + ") at each size**", "", *head]
        for label, pair in res["sizes"].items():
            lines.append(_train_row(f"{label} baseline", pair["baseline"], None))
            lines.append(_train_row(f"{label} optimized", pair["optimized"], pair["baseline"]))
        lines.append("")
    return lines


def render(data: dict) -> str:
    out = [BEGIN, "## Latest `python -m pretrain bench` run", ""]
    for name, entry in data["suites"].items():
        m = entry["machine"]
        out += [f"### {name} ({m.get('gpu', '?')}, driver {m.get('driver', '?')}, torch {m.get('torch')}, "
                f"triton {m.get('triton', '?')}, CUDA {m.get('cuda')}, {m.get('date')})", "",
                "```bash", *entry["commands"], "```", ""]
        res = entry["result"]
        if name == "llama":
            out += llama_tables(res)
            continue
        for h in res["harnesses"]:
            out += [f"`{h['command']}`", ""]
            out += (h["table"] if "error" not in h else ["failed: " + h["error"].strip()[-300:]]) + [""]
    return "\n".join(out + [END])


def update_doc(doc: Path, section: str, markers: tuple[str, str] = (BEGIN, END)) -> None:
    """Replace the marked section, or insert it before the first second-level heading."""
    text = doc.read_text()
    begin, end = markers
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        i = text.find("\n## ")
        text = text[:i + 1] + section + "\n\n" + text[i + 1:] if i >= 0 else text + "\n" + section + "\n"
    doc.write_text(text)
