"""Launch settings from one place: block sizes and warps derived from the problem size."""
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
