"""Tensor algebra against dense references written with einsum."""

from __future__ import annotations

import pytest
import torch

from tucker_peft.tensor_ops import fold, mode_dot, orthonormal, tucker_to_tensor, unfold, valid_tucker_ranks


def test_unfold_matches_definition_and_fold_inverts_it():
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    m = unfold(t, 2)
    assert m.shape == (4, 30)
    # Mat_2(T)[k, :] lists T[:, :, k, :] with the remaining modes in their order
    torch.testing.assert_close(m[1], t[:, :, 1, :].reshape(-1))
    for mode in range(4):
        torch.testing.assert_close(fold(unfold(t, mode), mode, t.shape), t)


def test_mode_dot_and_tucker_to_tensor_match_einsum():
    g = torch.Generator().manual_seed(0)
    core = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    u = [torch.randn(n, r, generator=g, dtype=torch.float64) for n, r in [(6, 2), (7, 3), (8, 4), (9, 5)]]
    torch.testing.assert_close(mode_dot(core, u[1], 1), torch.einsum("abcd,Bb->aBcd", core, u[1]))
    torch.testing.assert_close(tucker_to_tensor(core, u), torch.einsum("abcd,Aa,Bb,Cc,Dd->ABCD", core, *u))
    # factors on the leading modes only; trailing modes stay dense (conv "channels" mode)
    torch.testing.assert_close(tucker_to_tensor(core, u[:2]), torch.einsum("abcd,Aa,Bb->ABcd", core, *u[:2]))
    # mode product in unfolded form: Mat_i(T x_i M) = M Mat_i(T)
    torch.testing.assert_close(unfold(mode_dot(core, u[2], 2), 2), u[2] @ unfold(core, 2))


def test_orthonormal():
    q = orthonormal(20, 6, generator=torch.Generator().manual_seed(0))
    assert q.shape == (20, 6) and q.dtype == torch.float32 and q.is_contiguous()
    torch.testing.assert_close(q.T @ q, torch.eye(6), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        orthonormal(3, 4)


@pytest.mark.parametrize(
    ("ranks", "dense", "expected"),
    [
        ([4, 4], (), [4, 4]),
        ([5, 2], (), [2, 2]),
        ([8, 2], (3, 3), [8, 2]),
        ([8, 1], (2,), [2, 1]),
        ([3, 2, 1, 1], (), [2, 2, 1, 1]),
    ],
)
def test_valid_tucker_ranks(ranks, dense, expected):
    assert valid_tucker_ranks(ranks, dense) == expected
