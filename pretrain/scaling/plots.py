"""PNG plots of a scaling study: loss vs compute, isoFLOP curves, fit quality, loss vs GPU-hours.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no global backend
switch), so plotting works headless and from threads. Every function takes the same
`points_by_arch` (and `fits`, arch -> LawFit; an arch without a fit is drawn without curves) and
gives each architecture the same colour in every plot.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from pretrain.scaling.fit import LawFit, Point, compute_optimal, flops_per_param_token, frontier

DPI = 120
LOSS_LABEL = "validation loss (nats/token)"
BUDGET_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"))


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _colours(*dicts) -> dict[str, str]:
    """Archs sorted by name onto the tab10 cycle: the same arch gets the same colour in every plot."""
    archs = sorted({a for d in dicts for a in d})
    return {a: f"C{i % 10}" for i, a in enumerate(archs)}


def _usable(fit: LawFit | None) -> bool:
    return fit is not None and fit.alpha > 0 and fit.beta > 0


def plot_loss_vs_flops(points_by_arch: dict[str, list[Point]], fits: dict[str, LawFit], path) -> Path:
    """Observed loss vs training FLOPs (one thin line per model size N through its token counts),
    each arch's observed Pareto frontier (thick), and the fitted compute-optimal frontier
    L(N_opt(C), D_opt(C)) (dashed), extended one decade past the largest observed budget."""
    fig, ax = _figure()
    colours = _colours(points_by_arch, fits)
    for arch, pts in sorted(points_by_arch.items()):
        if not pts:
            continue
        c = colours[arch]
        by_n = defaultdict(list)
        for p in pts:
            by_n[p.n].append(p)
        for run in by_n.values():
            run.sort(key=lambda p: p.d)
            ax.plot([p.flops for p in run], [p.loss for p in run], "-o", color=c, alpha=0.35, lw=0.8, ms=3)
        front = frontier(pts)
        ax.plot([p.flops for p in front], [p.loss for p in front], "-", color=c, lw=2.2,
                label=f"{arch}: observed frontier ({len(pts)} evals, {len(by_n)} sizes)")
        fit = fits.get(arch)
        if _usable(fit):
            k = flops_per_param_token(pts)
            cs = np.geomspace(min(p.flops for p in pts), 10 * max(p.flops for p in pts), 100)
            n_opt, d_opt = compute_optimal(fit, k, cs)
            ax.plot(cs, fit.predict(n_opt, d_opt), "--", color=c, lw=1.5,
                    label=f"{arch}: fit, compute-optimal (N ∝ C^{fit.a:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Loss vs training compute (thin lines: one model size N across token counts D)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _default_budgets(points_by_arch) -> list[float]:
    """Four budgets evenly spaced in log between the smallest and largest observed FLOPs."""
    flops = [p.flops for pts in points_by_arch.values() for p in pts]
    if not flops:
        return []
    lo, hi = min(flops), max(flops)
    if hi <= lo:
        return [lo]
    return list(np.geomspace(lo, hi, 6)[1:-1])


def plot_isoflop(points_by_arch: dict[str, list[Point]], fits: dict[str, LawFit], path,
                 budgets: list[float] | None = None) -> Path:
    """IsoFLOP curves (Hoffmann et al. 2022, fig. 3): loss vs N at fixed compute C = k N D, from
    each arch's fit, with the fitted optimum marked (star) and the observed evaluations nearest to
    each budget (within half the log-spacing between budgets) overlaid with that budget's marker."""
    fig, ax = _figure()
    colours = _colours(points_by_arch, fits)
    budgets = sorted(budgets) if budgets is not None else _default_budgets(points_by_arch)
    logb = np.log10(budgets) if budgets else np.array([])
    half = np.diff(logb).min() / 2 if len(logb) > 1 else 0.25
    styles = {i: BUDGET_STYLES[i % len(BUDGET_STYLES)] for i in range(len(budgets))}
    for arch, pts in sorted(points_by_arch.items()):
        if not pts:
            continue
        c = colours[arch]
        fit = fits.get(arch)
        if _usable(fit):
            k = flops_per_param_token(pts)
            n_opt, d_opt = compute_optimal(fit, k, budgets)
            n_lo = min(min(p.n for p in pts), *n_opt) / 3
            n_hi = max(max(p.n for p in pts), *n_opt) * 3
            ns = np.geomspace(n_lo, n_hi, 200)
            for i, cb in enumerate(budgets):
                ax.plot(ns, fit.predict(ns, cb / (k * ns)), linestyle=styles[i][0], color=c, lw=1.4)
                ax.plot(n_opt[i], fit.predict(n_opt[i], d_opt[i]), "*", color=c, ms=12, mec="k", mew=0.6)
        for p in pts:
            if not budgets:
                break
            i = int(np.argmin(np.abs(logb - math.log10(p.flops))))
            if abs(logb[i] - math.log10(p.flops)) <= half:
                ax.plot(p.n, p.loss, styles[i][1], color=c, ms=6, alpha=0.8, mec="k", mew=0.4)
    # legend: colour = arch, line style + marker = budget
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[a], lw=2, label=a) for a in sorted(points_by_arch) if points_by_arch[a]]
    handles += [Line2D([], [], color="0.3", linestyle=styles[i][0], marker=styles[i][1],
                       label=f"C = {cb:.2g} FLOPs") for i, cb in enumerate(budgets)]
    handles.append(Line2D([], [], color="0.3", marker="*", linestyle="none", ms=10, label="fitted optimum"))
    ax.legend(handles=handles, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("IsoFLOP curves: loss vs model size at fixed training compute (fit; markers observed)")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_fit_vs_observed(points_by_arch: dict[str, list[Point]], fits: dict[str, LawFit], path) -> Path:
    """Predicted vs observed loss for every evaluation, with y = x: how well the law fits."""
    fig, ax = _figure()
    colours = _colours(points_by_arch, fits)
    lo, hi = math.inf, -math.inf
    for arch, pts in sorted(points_by_arch.items()):
        fit = fits.get(arch)
        if fit is None or not pts:
            continue
        pred = fit.predict([p.n for p in pts], [p.d for p in pts])
        obs = np.array([p.loss for p in pts])
        rms = float(np.sqrt(np.mean((pred / obs - 1) ** 2)))
        ax.scatter(pred, obs, color=colours[arch], s=18, alpha=0.8,
                   label=f"{arch}: rms rel. error {100 * rms:.2f}% ({len(pts)} evals)")
        lo, hi = min(lo, pred.min(), obs.min()), max(hi, pred.max(), obs.max())
    if math.isfinite(lo):
        pad = 0.03 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="0.4", lw=1, label="y = x")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no fitted architecture", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("predicted loss L(N, D) (nats/token)")
    ax.set_ylabel("observed " + LOSS_LABEL)
    ax.set_title("Scaling-law fit vs observed loss")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_speed_frontier(points_by_arch: dict[str, list[Point]], path) -> Path:
    """Loss vs measured GPU-hours with each arch's Pareto frontier: the wall-clock view of the study
    (FLOPs overstate an architecture whose kernels run slower per FLOP). Points without gpu_hours are skipped."""
    fig, ax = _figure()
    colours = _colours(points_by_arch)
    drawn = 0
    for arch, pts in sorted(points_by_arch.items()):
        timed = [p for p in pts if p.gpu_hours is not None and p.gpu_hours > 0]
        if not timed:
            continue
        c = colours[arch]
        ax.scatter([p.gpu_hours for p in timed], [p.loss for p in timed], color=c, s=14, alpha=0.4)
        front = frontier(timed, by="gpu_hours")
        ax.plot([p.gpu_hours for p in front], [p.loss for p in front], "-o", color=c, lw=2, ms=4,
                label=f"{arch}: frontier ({len(timed)} timed evals)")
        drawn += 1
    if drawn:
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no GPU-hour measurements in these runs", transform=ax.transAxes,
                ha="center", va="center")
    ax.set_xlabel("training time (GPU-hours)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Loss vs GPU-hours (measured throughput)")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_all(points_by_arch: dict[str, list[Point]], fits: dict[str, LawFit], out_dir,
             budgets: list[float] | None = None) -> list[Path]:
    """The four plots into out_dir: loss_vs_flops, isoflop, fit_vs_observed, speed_frontier (.png).
    budgets: the IsoFLOP curves' compute values (an IsoFLOP study's own budgets; default from the data)."""
    out = Path(out_dir)
    return [plot_loss_vs_flops(points_by_arch, fits, out / "loss_vs_flops.png"),
            plot_isoflop(points_by_arch, fits, out / "isoflop.png", budgets=budgets),
            plot_fit_vs_observed(points_by_arch, fits, out / "fit_vs_observed.png"),
            plot_speed_frontier(points_by_arch, out / "speed_frontier.png")]
