"""What tqdit's Triton GEMM kernels share (:mod:`tqdit.kernels.int8_gemm`, :mod:`tqdit.kernels.fp8_gemm`):
the grouped order of output tiles, the autotuner over a list of tilings, and the launch (one program
per output tile, or at most ``max_programs`` persistent ones that each walk several tiles)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of PyTorch
    triton = None


def autotuned(kernel, configs: list[dict], key: list[str], pre_hook=None):
    """``kernel`` autotuned over ``configs`` (upper-case keys: the kernel's block sizes; num_warps,
    num_stages and an optional maxnreg: launch settings), once per value of the ``key`` arguments.
    ``pre_hook(kernel_arguments)`` runs before every launch with the tiling among the arguments (to
    give tensor descriptors that tiling's block shapes)."""
    return triton.autotune(
        configs=[
            triton.Config(
                {k: v for k, v in c.items() if k.isupper()},
                num_warps=c["num_warps"],
                num_stages=c["num_stages"],
                maxnreg=c.get("maxnreg"),
                pre_hook=pre_hook,
            )
            for c in configs
        ],
        key=key,
    )(kernel)


def run(kernel, autotuned_kernel, m: int, n: int, args: tuple, flags: dict, config: dict | None,
        max_programs: int | None = None) -> None:
    """Launch one program per (BLOCK_M, BLOCK_N) output tile, or at most ``max_programs`` (a
    persistent kernel, which steps through the tiles by that number): ``autotuned_kernel`` where
    ``config`` is None, else ``kernel`` with that one tiling (e.g. the small one Triton's interpreter runs).
    """
    def programs(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (tiles if max_programs is None else min(tiles, max_programs),)

    if config is None:
        autotuned_kernel[programs](*args, **flags)
    else:
        kernel[programs(config)](*args, **flags, **config)


if triton is not None:

    @triton.jit
    def tile_offsets(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """The first output row and column of tile number ``tile``. Tiles go in grouped order: GROUP_M
        row tiles in turn take each column tile, so they share its weight tile while it is in L2."""
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = tile // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (tile % (GROUP_M * tiles_n)) % group_size
        tile_n = (tile % (GROUP_M * tiles_n)) // group_size
        return tile_m * BLOCK_M, tile_n * BLOCK_N

    @triton.jit
    def tile_rows_and_columns(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """The output rows and columns of this program's tile (one program per tile,
        :func:`tile_offsets`' order)."""
        first_row, first_col = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        return first_row + tl.arange(0, BLOCK_M), first_col + tl.arange(0, BLOCK_N)
