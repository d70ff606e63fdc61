import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure

from landscapes import plot_landscape, save_figure, slice_1d, slice_2d

X0 = np.array([1.0, 2.0, 0.5, 1.5])
SMALL = dict(radius=0.2, points=7, points_1d=15, progress=False)


def bowl(x):
    return float(np.sum((x - X0) ** 2))


def jagged(x):
    return bowl(x) + 0.05 * float(np.sum(np.sin(300 * x)))


def heatmaps(fig):
    """The heatmaps' meshes (the colour bar draws a QuadMesh too, on an unlabelled axis)."""
    axes = [ax for ax in fig.axes if ax.get_xlabel() == "offset along d1"]
    return [c for ax in axes for c in ax.collections if isinstance(c, QuadMesh)]


def test_computed_figure_has_heatmap_colour_bar_and_line():
    fig = plot_landscape(jagged, X0, title="demo", **SMALL)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3  # heatmap, its colour bar, 1-D line
    assert fig._suptitle.get_text() == "demo"
    heatmap = heatmaps(fig)[0].axes
    assert heatmap.get_xlabel() == "offset along d1" and heatmap.get_ylabel() == "offset along d2"
    assert "minima" in heatmap.get_title() and "R²" in heatmap.get_title()


def test_surface_adds_a_3d_panel():
    fig = plot_landscape(jagged, X0, surface3d=True, **SMALL)
    assert len(fig.axes) == 4
    assert sum(ax.name == "3d" for ax in fig.axes) == 1


def test_reference_objective_gets_a_row_on_the_same_scales():
    fig = plot_landscape(jagged, X0, reference=bowl, surface3d=True, **SMALL)
    assert len(fig.axes) == 7  # two rows of heatmap, surface, line; one shared colour bar
    main, ref = heatmaps(fig)
    assert main.norm is ref.norm
    values = np.concatenate([main.get_array().ravel(), ref.get_array().ravel()])
    assert (main.norm.vmin, main.norm.vmax) == pytest.approx((values.min(), values.max()))
    lines = [ax for ax in fig.axes if ax.name != "3d" and ax.get_xlabel() == "offset along d"]
    assert len(lines) == 2 and lines[0].get_ylim() == lines[1].get_ylim()
    surfaces = [ax for ax in fig.axes if ax.name == "3d"]
    assert surfaces[0].get_zlim() == surfaces[1].get_zlim()


def test_reference_is_sliced_along_the_same_directions():
    data = slice_2d(jagged, X0, radius=0.2, points=7, seed=5, progress=False)
    fig = plot_landscape(data=data, reference=bowl, progress=False)
    expected = slice_2d(bowl, X0, radius=0.2, points=7, seed=5, progress=False)["value"].to_numpy()
    ref = heatmaps(fig)[1].get_array().T.ravel()  # the heatmap shows values[i, j] transposed
    np.testing.assert_allclose(ref, expected)


def test_given_1d_frames_get_one_panel_each():
    frames = [slice_1d(jagged, X0, points=9, seed=s, progress=False) for s in (0, 1)]
    fig = plot_landscape(data=frames, reference=frames[0])
    assert len(fig.axes) == 3 and not heatmaps(fig)


def test_png_and_pdf_are_written_atomically(tmp_path):
    fig = plot_landscape(jagged, X0, reference=bowl, surface3d=True, **SMALL)
    png = save_figure(fig, tmp_path / "sub" / "landscape.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    pdf = save_figure(fig, tmp_path / "sub" / "landscape.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["landscape.pdf", "landscape.png"]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert png.stat().st_mode == plain.stat().st_mode  # umask permissions, not a temp file's 0600


def test_unknown_figure_extension_is_named(tmp_path):
    fig = plot_landscape(jagged, X0, **SMALL)
    with pytest.raises(ValueError, match=r"'\.txt'"):
        save_figure(fig, tmp_path / "landscape.txt")
    assert list(tmp_path.iterdir()) == []


def test_bad_plot_inputs_are_refused():
    grid = slice_2d(bowl, X0, points=5, progress=False)
    with pytest.raises(ValueError, match="either f and x0"):
        plot_landscape()
    with pytest.raises(ValueError, match="either f and x0"):
        plot_landscape(bowl, X0, data=grid)
    with pytest.raises(ValueError, match="2 2-D slices"):
        plot_landscape(data=[grid, grid])
    with pytest.raises(ValueError, match="both 0"):
        plot_landscape(bowl, X0, points=0, points_1d=0, progress=False)
    bare = grid.copy()
    bare.attrs = {}
    with pytest.raises(ValueError, match="attrs"):
        plot_landscape(data=bare, reference=bowl)


def test_non_finite_values_still_plot_with_roughness_marked_unavailable():
    grid = slice_2d(bowl, X0, points=5, progress=False)
    grid.loc[3, "value"] = np.inf
    fig = plot_landscape(data=grid)
    title = heatmaps(fig)[0].axes.get_title()
    assert "roughness n/a" in title and "non-finite" in title
    main = heatmaps(fig)[0]
    assert np.isfinite(main.norm.vmax)


def test_a_users_function_from_zeros_plots_and_the_caption_says_how_offsets_step():
    fig = plot_landscape(lambda x: float(np.sum(x**2)), np.zeros(4), radius=0.5, points=9, points_1d=9,
                         progress=False)
    heatmap = heatmaps(fig)[0].get_array()
    assert np.ptp(heatmap) > 0  # the slice moved
    assert "4 of 4 elements that are 0 in x0 take absolute steps" in fig._supxlabel.get_text()


def test_values_are_labelled_with_value_label():
    fig = plot_landscape(jagged, X0, value_label="change in top-1 (%)", **SMALL)
    colour_bar = [ax for ax in fig.axes if ax.get_ylabel() == "change in top-1 (%)" and not ax.get_xlabel()]
    line = [ax for ax in fig.axes if ax.get_xlabel() == "offset along d"]
    assert len(colour_bar) == 1 and line[0].get_ylabel() == "change in top-1 (%)"
