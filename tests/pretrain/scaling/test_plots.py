import math

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from pretrain.scaling.fit import LawFit, Point
from pretrain.scaling.plots import plot_all, plot_isoflop, plot_loss_vs_flops, plot_speed_frontier

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAWS = {"llama": LawFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0, n_points=16),
        "subllm": LawFit(E=1.75, A=300.0, B=500.0, alpha=0.32, beta=0.30, objective=0.0, n_points=16)}
K = {"llama": 6.0, "subllm": 4.5}
TOKENS_PER_SEC_AT_1E8 = {"llama": 1e5, "subllm": 7e4}


def points(arch, timed=True, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in np.geomspace(1e7, 1e8, 4):
        for d in np.geomspace(1e8, 2e9, 4):
            hours = d / (TOKENS_PER_SEC_AT_1E8[arch] * 1e8 / n) / 3600 if timed else None
            loss = float(LAWS[arch].predict(n, d) * math.exp(0.01 * rng.normal()))
            out.append(Point(arch, n, d, loss, K[arch] * n * d, hours, f"{arch}-{n:.0e}"))
    return out


def assert_png(path, min_bytes=20_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))  # empty axes at this size and dpi: ~12 kB


def pixels(path, colour) -> int:
    """How many pixels of the image are (nearly) this colour."""
    rgb = imread(path)[..., :3]
    return int((np.abs(rgb - np.array(to_rgb(colour))).max(axis=-1) < 0.08).sum())


def test_plot_all_writes_four_pngs(tmp_path):
    by_arch = {"llama": points("llama"), "subllm": points("subllm", seed=1)}
    paths = plot_all(by_arch, LAWS, tmp_path / "plots")
    assert [p.name for p in paths] == ["loss_vs_flops.png", "isoflop.png", "fit_vs_observed.png",
                                       "speed_frontier.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots"
        assert_png(p)
        # one colour per arch, the same in every plot: llama C0, subllm C1 (sorted names), nothing in C2
        assert pixels(p, "C0") > 100 and pixels(p, "C1") > 100 and pixels(p, "C2") == 0, p.name


def test_plots_survive_missing_fits_and_gpu_hours(tmp_path):
    # subllm's fit failed (not in fits) and nobody measured throughput: still four PNGs
    by_arch = {"llama": points("llama", timed=False), "subllm": points("subllm", timed=False)}
    for p in plot_all(by_arch, {"llama": LAWS["llama"]}, tmp_path):
        assert_png(p)
    empty = plot_speed_frontier({"llama": points("llama", timed=False)}, tmp_path / "speed.png")
    assert_png(empty, min_bytes=5_000)
    assert pixels(empty, "C0") == 0  # axes and a note, no data


def test_isoflop_with_explicit_budgets(tmp_path):
    path = plot_isoflop({"llama": points("llama")}, LAWS, tmp_path / "iso.png", budgets=[1e16, 1e17])
    assert_png(path)


def test_one_arch(tmp_path):
    for p in plot_all({"llama": points("llama")}, LAWS, tmp_path):
        assert_png(p)
        assert pixels(p, "C0") > 100 and pixels(p, "C1") == 0


def test_more_archs_than_colours(tmp_path):
    # tab10 wraps around rather than failing
    by_arch = {f"a{i:02d}": [Point(f"a{i:02d}", p.n, p.d, p.loss + 0.01 * i, p.flops) for p in points("llama")]
               for i in range(12)}
    assert_png(plot_loss_vs_flops(by_arch, {a: LAWS["llama"] for a in by_arch}, tmp_path / "many.png"))
