"""The lab's figure colours come from matplotlib's own property cycle, not a hand-kept palette."""

import numpy as np
import pytest

plotting = pytest.importorskip("attnfd_pipeline.experiments.plotting")


def test_series_colours_are_matplotlibs_cycle():
    plt = plotting.pyplot()
    from matplotlib.colors import to_rgb

    cycle = [to_rgb(c) for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]]
    for i in (0, 1, 3, 7, len(cycle) + 2):  # wraps around like matplotlib's "CN"
        assert to_rgb(plotting.series_rgb(None, i)) == cycle[i % len(cycle)]
        assert plotting.series_rgb(None, i) == plotting.cycle_color(i)
    assert plotting.series_rgb((255, 0, 51), 4) == (1.0, 0.0, 0.2)  # a caller's own RGB wins


def test_line_plot_draws_in_the_cycle_colour(tmp_path):
    from matplotlib.colors import to_rgb
    from PIL import Image

    path = plotting.line_plot(tmp_path / "one.png", [plotting.Series("a", [1, 2, 3], [1.0, 2.0, 3.0])])
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    c0 = np.round(np.array(to_rgb(plotting.cycle_color(0))) * 255).astype(int)
    assert (np.abs(pixels - c0).max(axis=1) <= 2).sum() > 50  # the line and its markers
