"""Console progress for the training loop: a tqdm bar plus a plain log line every N steps.

Rank 0 only (enabled=False elsewhere prints nothing). The animated bar is drawn only when
stderr is a terminal; under SLURM/nohup/CI the redraws would fill the log file with
carriage-return garbage, so there only the periodic lines are printed. Those lines carry
their own ETA for exactly that reason.

Metric keys the trainer may pass (any subset; missing ones are skipped, unknown ones are
appended as "key value"):
    loss, lr, grad_norm, tokens_per_sec, mem_gib
"""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

def _fmt_loss(v: float) -> str:
    return f"loss {v:.4g}"


def _fmt_lr(v: float) -> str:
    return f"lr {v:.1e}"


def _fmt_grad_norm(v: float) -> str:
    return f"grad_norm {v:.2f}"


def _fmt_tok_s(v: float) -> str:
    return f"{human(v)} tok/s"


def _fmt_mem(v: float) -> str:
    return f"mem {v:.1f} GiB"


# Known keys in display order, with how to render each value.
FORMATTERS = {
    "loss": _fmt_loss,
    "lr": _fmt_lr,
    "grad_norm": _fmt_grad_norm,
    "tokens_per_sec": _fmt_tok_s,
    "mem_gib": _fmt_mem,
}


def human(x: float) -> str:
    """12345 -> '12.3k', 4.5e6 -> '4.5M'."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def format_metrics(metrics: dict) -> list[str]:
    """Known keys first in a fixed order, then the rest in the order given."""
    parts = [FORMATTERS[k](float(metrics[k])) for k in FORMATTERS if k in metrics]
    for k, v in metrics.items():
        if k in FORMATTERS:
            continue
        if hasattr(v, "item"):  # 0-d torch tensor / numpy scalar
            v = v.item()
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        else:
            parts.append(f"{k} {v}")
    return parts


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool, log_every: int = 10):
        self.total_steps = total_steps
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.step = start_step
        # ETA is measured from the first update, not from construction: the first step
        # includes compilation and warmup and would make the estimate far too pessimistic.
        self._t0: float | None = None
        self._step0 = start_step
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def update(self, step: int, metrics: dict) -> None:
        """Report that `step` (absolute, 1-based count of completed steps) is done."""
        if not self.enabled:
            return
        now = time.monotonic()
        if self._t0 is None:
            self._t0, self._step0 = now, step
        self.step = step
        if self._bar is not None:
            post = [FORMATTERS[k](float(metrics[k])) for k in ("loss", "tokens_per_sec") if k in metrics]
            self._bar.set_postfix_str(" | ".join(post), refresh=False)
            self._bar.update(step - self._bar.n)  # redraws (rate-limited) with the new postfix
        if step % self.log_every == 0 or step == self.total_steps:
            parts = [f"step {step}/{self.total_steps}", *format_metrics(metrics)]
            eta = self._eta(now)
            if eta is not None:
                parts.append(f"eta {format_duration(eta)}")
            self.log(" | ".join(parts))

    def _eta(self, now: float) -> float | None:
        done = self.step - self._step0
        if self._t0 is None or done <= 0:
            return None
        eta = (now - self._t0) / done * max(0, self.total_steps - self.step)
        return eta if math.isfinite(eta) else None

    def log(self, msg: str) -> None:
        """Print a line without breaking the bar (tqdm.write moves it out of the way)."""
        if self.enabled:
            tqdm.write(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
