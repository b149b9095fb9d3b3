"""Compact weight files: float16 and int8 per output channel."""

import pytest
import torch
from helpers import tiny_config

from nucleiseg.models.build import build_model, load_weights
from nucleiseg.models.compact import compact_state, expand_state


def test_int8_round_trip_is_within_half_a_step_of_each_channel():
    generator = torch.Generator().manual_seed(0)
    state = {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=generator)
        * torch.arange(1, 9).view(-1, 1, 1, 1),
        "fc.weight": torch.randn(5, 7, generator=generator),
        "conv.bias": torch.randn(8, generator=generator),
        "bn.num_batches_tracked": torch.tensor(12),
    }
    stored = compact_state(state, "int8")
    assert stored["tensors"]["conv.weight"].dtype == torch.int8
    assert stored["tensors"]["conv.bias"].dtype == torch.float16
    restored = expand_state(stored)
    for name in ("conv.weight", "fc.weight"):
        step = state[name].abs().flatten(1).amax(1) / 127
        error = (restored[name] - state[name]).abs().flatten(1).amax(1)
        assert (error <= step / 2 + 1e-7).all(), name
        # Each channel's largest weight is stored exactly (to float rounding).
        peak = state[name].abs().flatten(1).amax(1)
        assert torch.allclose(restored[name].abs().flatten(1).amax(1), peak, rtol=1e-6)
    assert torch.equal(restored["conv.bias"], state["conv.bias"].half())
    assert torch.equal(restored["bn.num_batches_tracked"], state["bn.num_batches_tracked"])
    plain = compact_state(state, "float16")
    assert expand_state(plain) is plain
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        compact_state(state, "int4")


def test_int8_weights_load_and_predict_like_the_originals(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    torch.save(compact_state(model.state_dict(), "float16"), tmp_path / "fp16.pt")
    torch.save(compact_state(model.state_dict(), "int8"), tmp_path / "int8.pt")
    assert (tmp_path / "int8.pt").stat().st_size < 0.6 * (tmp_path / "fp16.pt").stat().st_size
    restored = build_model(tiny_config()).eval()
    load_weights(restored, tmp_path / "int8.pt")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = torch.sigmoid(model(images)), torch.sigmoid(restored(images))
    assert (expected - got).abs().max() < 0.02
