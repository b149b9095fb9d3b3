"""The tile-context diagnostic (benchmarks/tile_context.py): windowed squeeze-and-excitation."""

import torch
import torch.nn.functional as F
from helpers import tiny_config

from benchmarks.tile_context import box_mean, windowed_excitation
from nucleiseg.models.build import build_model


def test_box_mean_is_the_mean_over_the_window_cut_at_the_borders():
    x = torch.rand(2, 3, 23, 17, generator=torch.Generator().manual_seed(0))
    for side in (1, 4, 7, 40):
        before, after = side // 2, side - 1 - side // 2
        pad = (before, after, before, after)
        sums = F.avg_pool2d(F.pad(x, pad), side, stride=1)
        counts = F.avg_pool2d(F.pad(torch.ones(1, 1, 23, 17), pad), side, stride=1)
        torch.testing.assert_close(box_mean(x, side), sums / counts)
    # A window of twice the side covers every row and column from every position.
    torch.testing.assert_close(box_mean(x, 48), x.mean((2, 3), keepdim=True).expand_as(x))


def test_windowed_blocks_change_only_inputs_larger_than_the_window_and_are_put_back():
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        trained = model(image)
        with windowed_excitation(model, window=128) as swapped:
            same = model(image)  # the window holds the whole input: the blocks as trained
        with windowed_excitation(model, window=64):
            windowed = model(image)
        again = model(image)
    assert swapped == 16  # EfficientNet-B0's squeeze-and-excitation blocks
    torch.testing.assert_close(same, trained)
    assert (windowed - trained).abs().max() > 1e-4  # random weights: gates near 0.5, small moves
    torch.testing.assert_close(again, trained)
    assert not any(type(m).__name__ == "WindowedExcitation" for m in model.modules())
