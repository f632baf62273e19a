"""Wire coding of sparse positions: ascending gaps at the narrowest width that holds them.

Sparsifiers keep positions in ascending order, so consecutive gaps are small: at 1%
density they average ~100 and rarely pass a few thousand, whatever the tensor's size.
Sending gaps as uint8 / int16 / int32 / int64 (the narrowest that fits the largest gap,
the first position counting as a gap from zero) halves the index bytes of a typical top-k
payload against absolute int32 positions. Strictly positive gaps also make "unique and in
order" a property of the encoding, so decoding checks it in one pass instead of a sort.
"""

from __future__ import annotations

import torch

# Stable wire codes (payload.DTYPE_CODES holds 1-6); never renumber.
GAP_CODES: dict[torch.dtype, int] = {torch.uint8: 16, torch.int16: 17, torch.int32: 18, torch.int64: 19}
CODE_GAPS: dict[int, torch.dtype] = {v: k for k, v in GAP_CODES.items()}
_LIMITS = ((torch.uint8, 2**8 - 1), (torch.int16, 2**15 - 1), (torch.int32, 2**31 - 1))


def canonical_order(indices: torch.Tensor) -> torch.Tensor | None:
    """None when `indices` are strictly ascending, else the permutation that sorts them."""
    if indices.numel() < 2:
        return None
    idx = indices.long()
    if bool(torch.all(idx[1:] > idx[:-1])):
        return None
    return torch.argsort(idx)


def gaps_of(sorted_indices: torch.Tensor) -> torch.Tensor:
    idx = sorted_indices.long()
    if idx.numel() == 0:
        return idx
    return torch.cat([idx[:1], idx[1:] - idx[:-1]])


def gap_dtype(gaps: torch.Tensor) -> torch.dtype:
    largest = int(gaps.max()) if gaps.numel() else 0
    return next((dt for dt, limit in _LIMITS if largest <= limit), torch.int64)


def gap_width(indices: torch.Tensor) -> int:
    """Bytes per position on the wire for these indices (what `encode_gaps` will use)."""
    order = canonical_order(indices)
    gaps = gaps_of(indices if order is None else indices.long()[order])
    return torch.empty((), dtype=gap_dtype(gaps)).element_size()


def encode_gaps(sorted_indices: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(wire code, gap tensor) for strictly ascending positions."""
    gaps = gaps_of(sorted_indices)
    dtype = gap_dtype(gaps)
    return GAP_CODES[dtype], gaps.to(dtype)


class GapError(ValueError):
    """Gaps that do not describe strictly ascending positions inside the tensor."""


def decode_gaps(gaps: torch.Tensor, numel: int) -> torch.Tensor:
    """Positions (int64) from gaps, checked so no gap stream yields a wrong tensor.

    Every gap must lie in [0, numel) (the first, counted from 0) or [1, numel) (the rest), and
    every running position must rise strictly and stay below numel. Checking only the last
    position is not enough: gaps near 2**63 make the int64 running sum wrap, giving negative
    or repeated positions that end below numel. With every gap below 2**63 a wrap shows up
    as a position that does not rise, so the rise check catches it.
    """
    g = gaps.long()
    if g.numel() == 0:
        return g
    if int(g[0]) < 0:
        raise GapError("sparse index out of range: negative first position")
    if g.numel() > 1 and int(g[1:].min()) < 1:
        raise GapError("sparse payload repeats an index (positions must be strictly ascending)")
    if int(g.max()) >= numel:
        raise GapError(f"sparse index out of range: a gap of at least numel ({numel})")
    positions = torch.cumsum(g, 0)
    if g.numel() > 1 and not bool(torch.all(positions[1:] > positions[:-1])):
        raise GapError("sparse positions overflow: the running position does not rise")
    if int(positions[-1]) >= numel:
        raise GapError(f"sparse index out of range [0, {numel})")
    return positions
