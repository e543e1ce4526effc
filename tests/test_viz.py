"""Images for people: grids of frames of mixed aspect ratios."""

import numpy as np

from mpp.viz import grid


def test_a_grid_centres_frames_of_mixed_aspect_ratios_in_equal_cells():
    square, wide = np.zeros((128, 128, 3), np.uint8), np.full((80, 192, 3), 7, np.uint8)
    out = grid([[square, wide], [wide, square]], pad=2)
    assert out.shape == (2 + 2 * (128 + 2), 2 + 2 * (192 + 2), 3)
    assert (out[2:130, 2 + 32 : 2 + 32 + 128] == 0).all()  # the square centred in its 128×192 cell
    assert (out[2:130, 2:34] == 255).all()
    assert (out[2 + 24 : 2 + 24 + 80, 196:388] == 7).all()  # the wide frame centred vertically
    assert (out[2:26, 196:388] == 255).all()
