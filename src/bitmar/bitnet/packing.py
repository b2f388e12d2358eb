"""Packed ternary storage: 2 bits per weight (4 per byte) and base 3 (5 trits per byte, 1.6 bits per weight)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_BITS_PLACE = (1, 4, 16, 64)  # 2-bit code of element i of a group of 4 sits at bits 2i..2i+1
_TRITS_PLACE = (1, 3, 9, 27, 81)  # base-3 digit i of a group of 5
_TRITS_MAX_BYTE = 3**5 - 1  # 242: bytes above this never come out of pack_ternary_base3


def _ternary_codes(t: Tensor) -> Tensor:  # any shape -> (n,) uint8 codes in {0, 1, 2} (= t + 1)
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"pack_ternary expects a real tensor with values in {{-1, 0, 1}}, got dtype {t.dtype}")
    flat = t.detach().reshape(-1)
    if flat.numel() and not bool(((flat == -1) | (flat == 0) | (flat == 1)).all()):
        bad = flat[~((flat == -1) | (flat == 0) | (flat == 1))][:3].tolist()
        raise ValueError(
            f"pack_ternary expects values in {{-1, 0, 1}}, found e.g. {bad}; quantize first with quantize_weights()"
        )
    return (flat.to(torch.int8) + 1).to(torch.uint8)


def _padded_groups(codes: Tensor, group: int) -> Tensor:  # (n,) -> (ceil(n / group), group), padded with code 1 (= 0)
    pad = (-codes.numel()) % group
    if pad:
        codes = torch.cat([codes, codes.new_ones(pad)])
    return codes.view(-1, group)


def _check_packed(packed: Tensor, shape: Sequence[int], per_byte: int, fmt: str) -> int:
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"{fmt}: packed bytes must be a 1-d uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    numel = math.prod(int(s) for s in shape)
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"{fmt}: invalid shape {tuple(shape)}")
    expected = -(-numel // per_byte)
    if packed.numel() != expected:
        raise ValueError(
            f"{fmt}: {packed.numel()} bytes cannot hold shape {tuple(shape)} ({numel} values need {expected} bytes);"
            " pass the shape the tensor was packed with"
        )
    return numel


def pack_ternary(t: Tensor) -> Tensor:  # any shape -> (ceil(numel / 4),) uint8
    """Pack ternary values {-1, 0, 1} at 2 bits each (4 per byte, code = t + 1), in row-major order.

    The shape is not stored: pass it to `unpack_ternary`. Any element count works (the last byte is padded).
    """
    groups = _padded_groups(_ternary_codes(t), 4)  # (B, 4)
    place = torch.tensor(_BITS_PLACE, dtype=torch.uint8, device=groups.device)
    return (groups * place).sum(dim=1, dtype=torch.uint8)


def unpack_ternary(packed: Tensor, shape: Sequence[int] | torch.Size) -> Tensor:  # (B,) uint8 -> shape, int8
    """Inverse of `pack_ternary`: int8 tensor of `shape` with values in {-1, 0, 1}."""
    shape = tuple(int(s) for s in shape)
    numel = _check_packed(packed, shape, 4, "unpack_ternary")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts) & 3  # (B, 4)
    if bool((codes == 3).any()):
        raise ValueError("unpack_ternary: byte holds the unused code 3; the data was not written by pack_ternary")
    return (codes.view(-1)[:numel].to(torch.int8) - 1).view(shape)


def pack_ternary_base3(t: Tensor) -> Tensor:  # any shape -> (ceil(numel / 5),) uint8
    """Pack ternary values at 1.6 bits each: 5 base-3 digits (t + 1) per byte, 3^5 = 243 <= 256.

    The shape is not stored: pass it to `unpack_ternary_base3`. Any element count works.
    """
    groups = _padded_groups(_ternary_codes(t), 5)  # (B, 5)
    place = torch.tensor(_TRITS_PLACE, dtype=torch.uint8, device=groups.device)
    return (groups * place).sum(dim=1, dtype=torch.uint8)  # at most 2 * 121 = 242: no overflow


def unpack_ternary_base3(packed: Tensor, shape: Sequence[int] | torch.Size) -> Tensor:  # (B,) uint8 -> shape, int8
    """Inverse of `pack_ternary_base3`: int8 tensor of `shape` with values in {-1, 0, 1}."""
    shape = tuple(int(s) for s in shape)
    numel = _check_packed(packed, shape, 5, "unpack_ternary_base3")
    if packed.numel() and int(packed.max()) > _TRITS_MAX_BYTE:
        raise ValueError(f"unpack_ternary_base3: byte {int(packed.max())} > 242 was not written by pack_ternary_base3")
    place = torch.tensor(_TRITS_PLACE, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) // place) % 3  # (B, 5)
    return (codes.view(-1)[:numel].to(torch.int8) - 1).view(shape)


def packed_bits_per_weight(numel: int, base3: bool = False) -> float:
    """Storage cost of `numel` ternary weights in bits per weight (2.0 or 1.6 up to the last partial byte)."""
    if numel <= 0:
        raise ValueError(f"numel must be > 0, got {numel}")
    return 8 * -(-numel // (5 if base3 else 4)) / numel
