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


def elementwise_warps(block: int) -> int:
    """Warps for the 1-D row kernels: at most 4 elements a thread (4 warps up to 512, 8 at 1024). Why: bt_loss
    keeps ~8 per-element values live, and 1024 elements on 4 warps (8 a thread) took 53-64 registers, capping
    sm_90 at 50% occupancy; on 8 warps it takes 32, 100% (benchmarks/triton_compile_table.py)."""
    return max(4, block // 128)


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
    block_h: int  # columns (BLOCK_H): the whole row, H <= block_h
    num_warps: int


# Programs per multiprocessor for the one-pass kernel. Each program's run stays long (B=16384 on 132 SMs: 31
# rows) so its dW flushes (one atomic per column per head change) stay ~3% of the row traffic. Not all of them
# are resident at once: at H = 4096 (32 warps, 40-56 registers) one program fills half an SM's warp slots, so
# the grid runs in waves of one or two programs per SM.
SORTED_PROGRAMS_PER_SM = 4


def sorted_warps(block: int) -> int:
    """Warps for the one-pass kernel: at most 4 columns a thread (block / 128 warps, at least row_launch's).
    Why: each program keeps four row vectors live (partial dW, W[c], h+, h-); with row_launch's 16 warps at
    4096 columns (8 a thread) it took 98-106 registers on sm_90 (one 16-warp program per SM: 25% occupancy) and
    spilled on sm_80 (bf16/fp16: 64 registers, 8 bytes); 32 warps: 40-56 registers, no spill, 50%."""
    return max(num_warps(block), block // 128)


def sorted_rows_launch(B: int, H: int, multiprocessors: int) -> SortedRowsLaunch:
    programs = max(1, min(B, multiprocessors * SORTED_PROGRAMS_PER_SM))
    rows = -(-B // programs)  # ceil
    blk = hidden_block(H)
    return SortedRowsLaunch(-(-B // rows), rows, blk, sorted_warps(blk))
