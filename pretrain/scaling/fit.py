"""Fit L(N, D) = E + A/N^alpha + B/D^beta to a scaling study's evaluations (pure numpy/scipy).

The fit is Chinchilla's "approach 3" (Hoffmann et al. 2022, "Training Compute-Optimal Large
Language Models", appendix D.2): with a = log A, b = log B, e = log E, minimise

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

with L-BFGS from a grid of initialisations and keep the best. Fitting in log space weighs every
point by its relative error; the Huber loss (delta = 1e-3) keeps one bad evaluation from dragging
the exponents. From the fit follow the compute-optimal allocation N_opt(C), D_opt(C) for C = k N D.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

PARAMS = ("E", "A", "B", "alpha", "beta")


@dataclass(frozen=True)
class Point:
    """One evaluation of one run of a study."""
    arch: str            # "llama", "subllm", ...
    n: float             # parameters used by the law (non-embedding by default)
    d: float             # training tokens at this evaluation (after a WSD decay)
    loss: float          # validation loss there
    flops: float         # training FLOPs to reach d (flops_per_token * d, architecture-specific)
    gpu_hours: float | None = None   # measured: d / tokens_per_sec * gpus / 3600 (None if unknown)
    run: str = ""        # run name, for tables


@dataclass
class LawFit:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float     # the Huber objective at the optimum (log-space residuals)
    n_points: int

    def predict(self, n, d):
        """Loss at n parameters and d tokens; numpy broadcasting over n and d."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def a(self) -> float:
        """N_opt grows as C^a (Hoffmann et al.'s notation)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt grows as C^b; a + b = 1."""
        return self.alpha / (self.alpha + self.beta)

    def theta(self) -> np.ndarray:
        """(log A, log B, log E, alpha, beta): the parameterisation the objective is minimised in."""
        # a term the fit drove to zero (exp underflow, e.g. E on data that show no floor) stays finite
        log = lambda x: math.log(max(x, np.finfo(float).tiny))
        return np.array([log(self.A), log(self.B), log(self.E), self.alpha, self.beta])

    def as_dict(self) -> dict:
        return {**asdict(self), "a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, d: dict) -> "LawFit":
        return cls(**{k: d[k] for k in (*PARAMS, "objective", "n_points")})


def _default_grid() -> np.ndarray:
    """Hoffmann et al. 2022, D.2: alpha, beta in {0,...,2}, e in {-1,...,1}, a, b in {0,...,25}."""
    ab = np.arange(0.0, 26.0, 5.0)
    e = np.arange(-1.0, 1.01, 0.5)
    ex = np.arange(0.0, 2.01, 0.5)
    return np.array(list(itertools.product(ab, ab, e, ex, ex)))  # (a, b, e, alpha, beta): 4500 rows


def _objective(u: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, delta: float):
    """Huber-on-LSE objective and its gradient for parameter rows u (S, 5), vectorised over S.

    u = (a_c, b_c, e, alpha, beta) with a_c = a - alpha * mean(log N) (same for b): x, y are the
    *centred* log N, log D, z = log L. Centring decorrelates a from alpha (otherwise a ~ 16 alpha
    along a long, thin valley) and makes L-BFGS converge in far fewer iterations; the optimum is
    the same up to the change of variables.
    """
    ac, bc, e, al, be = (u[:, i:i + 1] for i in range(5))            # each (S, 1)
    t = np.stack(np.broadcast_arrays(ac - al * x, bc - be * y, e))    # (3, S, P)
    m = t.max(axis=0)
    w = np.exp(t - m)
    s = w.sum(axis=0)
    w /= s                                                            # softmax = d LSE / d t
    r = m + np.log(s) - z                                             # residuals in log loss
    ar = np.abs(r)
    huber = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum(axis=1)
    gw = np.clip(r, -delta, delta) * w                                # d Huber / d t
    grad = np.stack([gw[0].sum(1), gw[1].sum(1), gw[2].sum(1),
                     -(gw[0] * x).sum(1), -(gw[1] * y).sum(1)], axis=1)
    return huber, grad


def _one_blas_thread():
    """L-BFGS-B calls BLAS on its small (2m x 2m) matrices, and OpenBLAS then keeps a thread per core
    spinning: twice the CPU for the same wall time, and much slower when other work holds the cores.
    threadpoolctl is optional (it comes with scikit-learn); without it the fit is only less frugal."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def check_points(points) -> None:
    """Raise ValueError naming what is missing or wrong for a 5-parameter fit."""
    points = list(points)
    if len(points) < 5:
        raise ValueError(f"need at least 5 points to fit E, A, B, alpha, beta; got {len(points)}")
    for p in points:
        for field in ("n", "d", "loss"):
            v = getattr(p, field)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{field} must be positive and finite; got {v!r} in run {p.run or '?'} "
                                 f"(arch {p.arch}, n={p.n:g}, d={p.d:g})")
    for field, what in (("n", "parameter counts N"), ("d", "token counts D")):
        distinct = sorted({getattr(p, field) for p in points})
        if len(distinct) < 2:
            raise ValueError(f"need at least 2 distinct {what} to separate the two power laws; "
                             f"got only {distinct[0]:g}")


def fit_law(points, *, delta: float = 1e-3, inits=None, max_starts: int = 50) -> LawFit:
    """Chinchilla approach-3 fit (Hoffmann et al. 2022, D.2) of L(N, D) to `points`.

    inits: rows (log A, log B, log E, alpha, beta) to start from; default the paper's 4500-point
    grid. The objective is evaluated at every start (vectorised, about a millisecond) and L-BFGS-B
    runs from the best `max_starts` of them only (on synthetic studies the best of 50 reached the
    same optimum as 300 or all 4500 starts, at 1/90 of the cost of all). Unlike the paper, alpha and
    beta are bounded below by 0: a negative exponent would make loss grow with scale.
    """
    points = list(points)
    check_points(points)
    logn = np.log([p.n for p in points])
    logd = np.log([p.d for p in points])
    z = np.log([p.loss for p in points])
    mn, md = logn.mean(), logd.mean()
    x, y = logn - mn, logd - md

    starts = _default_grid() if inits is None else np.atleast_2d(np.asarray(inits, dtype=float))
    if starts.shape[1:] != (5,):
        raise ValueError(f"inits must be rows of (log A, log B, log E, alpha, beta); got shape {starts.shape}")
    u0 = starts.copy()
    u0[:, 0] -= u0[:, 3] * mn
    u0[:, 1] -= u0[:, 4] * md
    f0, _ = _objective(u0, x, y, z, delta)
    u0 = u0[np.argsort(f0, kind="stable")[:max_starts]]

    # Divide by delta so the objective is O(1) per point (|r| - delta/2 outside the quadratic zone);
    # L-BFGS-B's stopping tests are then meaningful at the tiny residuals a good fit reaches.
    def fun(u):
        f, g = _objective(u[None], x, y, z, delta)
        return f[0] / delta, g[0] / delta

    bounds = [(None, None)] * 3 + [(0.0, None)] * 2
    best = None
    with _one_blas_thread():
        for u in u0:
            res = minimize(fun, u, jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
            if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
                best = res
    if best is None:
        raise ValueError(f"the fit diverged from all {len(u0)} starts (non-finite parameters)")
    ac, bc, e, al, be = best.x
    return LawFit(E=math.exp(e), A=math.exp(ac + al * mn), B=math.exp(bc + be * md), alpha=float(al),
                  beta=float(be), objective=float(best.fun * delta), n_points=len(points))


def _distinct(points, field: str) -> int:
    return len({getattr(p, field) for p in points})


def bootstrap(points, *, samples: int = 200, seed: int = 0, **fit_kw) -> dict[str, tuple[float, float]]:
    """5-95% percentile intervals of E, A, B, alpha, beta, a, b from refits on resampled points.

    Points are resampled with replacement; resamples with fewer than 2 distinct N or D, or fewer
    than 5 distinct points (5 parameters would be underdetermined), are skipped. Each refit starts
    from the full-data optimum only, which is where a resample's optimum lies nearby.
    """
    points = list(points)
    full = fit_law(points, **fit_kw)
    fit_kw = {k: v for k, v in fit_kw.items() if k != "inits"}
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(samples):
        sample = [points[i] for i in rng.integers(0, len(points), len(points))]
        if _distinct(sample, "n") < 2 or _distinct(sample, "d") < 2 or len(set(sample)) < 5:
            continue
        f = fit_law(sample, inits=full.theta(), **fit_kw)
        rows.append([f.E, f.A, f.B, f.alpha, f.beta, f.a, f.b])
    if not rows:
        raise ValueError(f"no usable bootstrap resample out of {samples} (too few distinct N, D or points)")
    lo, hi = np.percentile(np.array(rows), [5, 95], axis=0)
    return {k: (float(l), float(h)) for k, l, h in zip((*PARAMS, "a", "b"), lo, hi)}


def leave_largest_out(points, **fit_kw) -> dict:
    """Fit without the largest-N points and predict them: does the law extrapolate one step up?"""
    points = list(points)
    n_max = max(p.n for p in points)
    train = [p for p in points if p.n < n_max]
    held = sorted((p for p in points if p.n == n_max), key=lambda p: p.d)
    try:
        f = fit_law(train, **fit_kw)
    except ValueError as e:
        raise ValueError(f"leave-largest-out: without N={n_max:g} the rest cannot be fitted: {e}") from None
    pred = f.predict([p.n for p in held], [p.d for p in held])
    obs = np.array([p.loss for p in held])
    rel = np.abs(pred - obs) / obs
    return {"held_out_n": float(n_max), "held_out_d": [float(p.d) for p in held],
            "predicted": pred.tolist(), "observed": obs.tolist(),
            "mean_abs_rel_error": float(rel.mean()), "max_abs_rel_error": float(rel.max())}


def compute_optimal(fit: LawFit, flops_per_param_token: float, compute):
    """(N_opt, D_opt) minimising L(N, D) subject to C = k N D; vectorised over `compute`.

    Setting dL/dN = 0 along D = C / (k N) gives N_opt = G (C/k)^a, D_opt = (C/k)^b / G with
    G = (alpha A / (beta B))^(1 / (alpha + beta)), a = beta / (alpha + beta), b = alpha / (alpha + beta)
    (Hoffmann et al. 2022, D.2, with k = 6 for a dense transformer).
    """
    if fit.alpha <= 0 or fit.beta <= 0:
        raise ValueError(f"compute-optimal allocation needs alpha, beta > 0; got {fit.alpha:g}, {fit.beta:g}")
    c = np.asarray(compute, dtype=float) / flops_per_param_token
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / (fit.alpha + fit.beta))
    return g * c ** fit.a, c ** fit.b / g


def frontier(points, *, by: str = "flops") -> list[Point]:
    """Pareto frontier of loss vs `by` ("flops" or "gpu_hours"), sorted by cost: the points that no
    other point dominates (<= cost and <= loss, one of them strictly; of exact duplicates one is
    kept). Points whose cost is None are left out."""
    pts = sorted((p for p in points if getattr(p, by) is not None), key=lambda p: (getattr(p, by), p.loss))
    out, best = [], math.inf
    for p in pts:
        if p.loss < best:
            out.append(p)
            best = p.loss
    return out


def flops_per_param_token(points) -> float:
    """k in C = k N D for these points: the median of flops / (n d) (about 6 for a dense transformer)."""
    return float(np.median([p.flops / (p.n * p.d) for p in points]))


def report(points_by_arch: dict[str, list[Point]], *, targets: list[float] | None = None,
           bootstrap_samples: int = 200, seed: int = 0, compute: list[float] | None = None) -> dict:
    """Everything `scaling fit` prints and logs, per architecture (JSON-serialisable).

    compute: budgets (FLOPs) for the compute-optimal N/D; default the three powers of ten from the
    largest observed budget (over all archs, so archs are comparable) upwards. targets: parameter
    counts at which to predict the loss with D = 20 N (Hoffmann et al.'s tokens-per-parameter ratio).
    An arch whose fit fails gets {"n_points", "error"} instead of stopping the others.
    """
    targets = list(targets or [])
    if compute is None:
        top = max((p.flops for pts in points_by_arch.values() for p in pts), default=1e18)
        compute = [10.0 ** (math.ceil(math.log10(top)) + i) for i in range(3)]
    out = {}
    for arch, pts in points_by_arch.items():
        entry: dict = {"n_points": len(pts)}
        out[arch] = entry
        try:
            fit = fit_law(pts)
        except ValueError as e:
            entry["error"] = str(e)
            continue
        entry["fit"] = fit.as_dict()
        try:
            entry["ci"] = {k: list(v) for k, v in bootstrap(pts, samples=bootstrap_samples, seed=seed).items()}
        except ValueError as e:
            entry["ci"] = {"error": str(e)}
        try:
            entry["leave_largest_out"] = leave_largest_out(pts)
        except ValueError as e:
            entry["leave_largest_out"] = {"error": str(e)}
        k = flops_per_param_token(pts)
        entry["k"] = k
        n_opt, d_opt = compute_optimal(fit, k, compute) if fit.alpha > 0 and fit.beta > 0 else ([], [])
        entry["compute_optimal"] = [{"compute": float(c), "n": float(n), "d": float(d),
                                     "loss": float(fit.predict(n, d))} for c, n, d in zip(compute, n_opt, d_opt)]
        entry["targets"] = [{"n": float(n), "d": 20.0 * n, "loss": float(fit.predict(n, 20.0 * n))}
                            for n in targets]
    return out


def fits_from_report(rep: dict) -> dict[str, LawFit]:
    """The LawFit of every arch whose fit succeeded (for plots)."""
    return {arch: LawFit.from_dict(e["fit"]) for arch, e in rep.items() if "fit" in e}


def si(x: float) -> str:
    """3 significant digits with an SI prefix: 1.3e9 -> '1.3G' (parameters, tokens, FLOPs)."""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def markdown_table(rep: dict) -> str:
    """One row per arch: the law's parameters with 5-95% bootstrap intervals, the compute-optimal
    exponents, the leave-largest-out error and the predicted loss at each target N (D = 20 N)."""
    targets = sorted({t["n"] for e in rep.values() for t in e.get("targets", [])})
    head = ["arch", "points", "E", "A", "α", "B", "β", "a (N∝C^a)", "b (D∝C^b)",
            "leave-largest-out err (mean / max)"] + [f"L({si(n)}, D=20N)" for n in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch, e in rep.items():
        if "fit" not in e:
            lines.append("| " + " | ".join([arch, str(e["n_points"]), f"fit failed: {e['error']}"]
                                           + [""] * (len(head) - 3)) + " |")
            continue
        fit, ci = e["fit"], e.get("ci", {})

        def cell(k):
            return f"{fit[k]:.3g} [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else f"{fit[k]:.3g}"

        llo = e.get("leave_largest_out", {})
        llo_cell = (f"{100 * llo['mean_abs_rel_error']:.2f}% / {100 * llo['max_abs_rel_error']:.2f}%"
                    if "mean_abs_rel_error" in llo else "—")
        by_n = {t["n"]: t["loss"] for t in e.get("targets", [])}
        # with alpha or beta at 0 there is no compute-optimal allocation (a, b would read 1 and 0)
        optimal = [cell("a"), cell("b")] if fit["alpha"] > 0 and fit["beta"] > 0 else ["— (α or β = 0)"] * 2
        row = [arch, str(e["n_points"]), cell("E"), cell("A"), cell("alpha"), cell("B"), cell("beta"),
               *optimal, llo_cell] + [f"{by_n[n]:.3f}" if n in by_n else "—" for n in targets]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
