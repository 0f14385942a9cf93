import torch
from PIL import Image

from latent_prior.images import labelled_panels, make_grid, save_pngs, to_uint8


def test_to_uint8_maps_the_range_ends_and_clips():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    assert to_uint8(x).flatten().tolist() == [0, 128, 255, 255]


def test_grid_places_each_tile(tmp_path):
    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 1.0, -1.0)])
    grid = make_grid(images, ncol=2, padding=1, scale=2)
    assert grid.size == (2 * 9 + 1, 2 * 9 + 1)
    assert grid.getpixel((1, 1)) == (0, 0, 0) and grid.getpixel((10, 1)) == (255, 255, 255)
    assert grid.getpixel((1, 10)) == (0, 0, 0)  # third tile, second row
    paths = save_pngs(images[:, :1], tmp_path / "pngs")
    assert [p.name for p in paths] == ["sample_000000.png", "sample_000001.png", "sample_000002.png"]
    assert Image.open(paths[1]).mode == "L" and Image.open(paths[1]).getpixel((0, 0)) == 255


def test_labelled_panels_are_side_by_side():
    a, b = -torch.ones(4, 3, 8, 8), torch.ones(4, 3, 8, 8)
    canvas = labelled_panels([("left", a), ("right", b)], ncol=2, gap=10)
    single = make_grid(a, ncol=2)
    assert canvas.width == 2 * single.width + 10 and canvas.height > single.height
