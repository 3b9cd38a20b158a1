"""Fast Walsh-Hadamard transform kernel (Triton interpreter) against the dense float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_case import rel_err

from tpla_kernels.hadamard import hadamard_matrix, hadamard_transform_reference


@pytest.mark.parametrize("shape,dtype,normalize", [
    ((7, 1024), torch.float32, True),
    ((3, 5, 128), torch.bfloat16, True),
    ((9, 16), torch.float16, False),
    ((4, 2), torch.float32, False),
    ((6, 1), torch.float32, True),
])
def test_fwht_matches_reference(
    interp, shape: tuple[int, ...], dtype: torch.dtype, normalize: bool,  # noqa: ANN001
) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    y = interp.hadamard_transform(x, normalize=normalize)
    ref = hadamard_transform_reference(x, normalize=normalize)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_fwht_in_place_and_strided_input(interp) -> None:  # noqa: ANN001
    base = torch.randn(6, 2 * 256, generator=torch.Generator().manual_seed(1))
    x = base[:, ::2]  # last dim not contiguous
    y = interp.hadamard_transform(x)
    assert rel_err(y, hadamard_transform_reference(x)) < 1e-6
    z = base[:, :256].contiguous()
    twice = interp.hadamard_transform(interp.hadamard_transform(z), out=None)
    assert rel_err(twice, z) < 1e-6  # the normalized transform is its own inverse
    same = interp.hadamard_transform(z, out=z)
    assert rel_err(same, hadamard_transform_reference(base[:, :256])) < 1e-6


def test_hadamard_matrix_is_orthogonal_and_sylvester() -> None:
    h = hadamard_matrix(64)
    assert torch.equal(h @ h.T, 64 * torch.eye(64, dtype=h.dtype))
    i, j = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    popcount = torch.zeros_like(i)
    for bit in range(6):
        popcount += ((i & j) >> bit) & 1
    assert torch.equal(h, (1 - 2 * (popcount % 2)).double())


def test_bad_inputs_raise(interp) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="power of two"):
        interp.hadamard_transform(torch.randn(4, 24))
    with pytest.raises(ValueError, match="power of two"):
        interp.hadamard_transform(torch.randn(2, 2048))
    with pytest.raises(ValueError, match="dtype"):
        interp.hadamard_transform(torch.randn(2, 8).double())
    with pytest.raises(ValueError, match="out"):
        interp.hadamard_transform(torch.randn(2, 8), out=torch.empty(2, 4))
    assert math.isclose(float(hadamard_transform_reference(torch.ones(1, 4))[0, 0]), 2.0)
