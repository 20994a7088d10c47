"""Launch settings from one place: block sizes, warps and grid splits derived from the problem size.

Every launcher in optimas_fast/ops/_triton.py takes its constants from here; no kernel call site picks a
block size or a warp count of its own."""
from __future__ import annotations

from typing import NamedTuple

import triton


def hidden_block(H: int) -> int:
    """Columns one program processes per step: the whole row up to 4096 (one pass, registers), else
    4096-wide chunks (a loop)."""
    return min(triton.next_power_of_2(max(H, 16)), 4096)


def num_warps(block: int) -> int:
    # 32 threads x 4 elements per warp-step: 4 warps up to 2048 columns, 8 above, 16 at 4096+.
    if block >= 4096:
        return 16
    if block >= 2048:
        return 8
    return 4


def row_block(B: int) -> int:
    """Elements per program for 1-D row-wise kernels (bt_loss)."""
    return min(triton.next_power_of_2(max(B, 16)), 1024)


class RowLaunch(NamedTuple):
    """One program per row, looping over the hidden dimension (multihead, fused loss, last token)."""

    block_h: int  # columns per step (BLOCK_H)
    num_warps: int


def row_launch(H: int) -> RowLaunch:
    blk = hidden_block(H)
    return RowLaunch(blk, num_warps(blk))


class SegmentLaunch(NamedTuple):
    """The segmented dW reduction: grid (C, cdiv(H, block_h), split)."""

    block_h: int  # columns per program (BLOCK_H)
    split: int  # programs sharing one head's rows (SPLIT): one atomic add per program and column
    num_warps: int


# Column blocks of the dW reduction stay at <= 1024: each program holds one fp32 accumulator per column
# and the grid gets its parallelism from (heads x column blocks x split), not from wide rows.
SEGMENT_MAX_BLOCK = 1024
SEGMENT_MAX_SPLIT = 64
SEGMENT_ROWS_PER_PROGRAM = 32  # fewest rows a program sums before its one atomic add (on average)


def segment_launch(N: int, C: int, H: int) -> SegmentLaunch:
    """Enough programs to fill the machine even when one head owns every row (C = 1), while each
    program still sums many rows before its one atomic add."""
    blk = min(hidden_block(H), SEGMENT_MAX_BLOCK)
    split = max(1, min(SEGMENT_MAX_SPLIT, N // max(C * SEGMENT_ROWS_PER_PROGRAM, 1)))
    return SegmentLaunch(blk, split, num_warps(blk))


class SortedRowsLaunch(NamedTuple):
    """The one-pass fused loss over head-sorted rows: grid (programs,), each a contiguous run of rows."""

    programs: int
    rows_per_program: int


# Programs per multiprocessor for the one-pass kernel: 4 x 16 warps (H = 4096) fills an SM's 64 warp slots,
# and each program's run stays long (B=16384 on 132 SMs: 31 rows) so its dW flushes (one atomic per column
# per head change) stay ~3% of the row traffic.
SORTED_PROGRAMS_PER_SM = 4


def sorted_rows_launch(B: int, multiprocessors: int) -> SortedRowsLaunch:
    programs = max(1, min(B, multiprocessors * SORTED_PROGRAMS_PER_SM))
    rows = -(-B // programs)  # ceil
    return SortedRowsLaunch(-(-B // rows), rows)
