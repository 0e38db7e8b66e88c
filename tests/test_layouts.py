from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptcheck.layouts import change_rotary, half_to_interleaved, interleaved_to_half


@settings(max_examples=60, deadline=None)
@given(kv=st.integers(1, 4), groups=st.integers(1, 4), half_hd=st.integers(1, 8), cols=st.integers(1, 16))
def test_permutation_round_trips_for_q_and_k(kv: int, groups: int, half_hd: int, cols: int) -> None:
    heads, hd = kv * groups, 2 * half_hd
    wq = torch.randn(heads * hd, cols)
    wk = torch.randn(kv * hd, cols)
    assert torch.equal(half_to_interleaved(interleaved_to_half(wq, heads), heads), wq)
    assert torch.equal(interleaved_to_half(half_to_interleaved(wk, kv), kv), wk)


def test_permutation_moves_interleaved_pairs_to_halves() -> None:
    # one head of 4 rows [r0 r1 r2 r3]: Meta pairs (r0,r1),(r2,r3); HF halves (r0,r2 | r1,r3)
    w = torch.arange(4.0).view(4, 1)
    assert interleaved_to_half(w, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_only_wq_and_wk_change() -> None:
    w = torch.randn(8, 4)
    assert change_rotary("layers.0.attention.wv.weight", w, "interleaved", "half", 2, 1) is w
    assert not torch.equal(change_rotary("layers.0.attention.wk.weight", w, "interleaved", "half", 2, 1), w)
