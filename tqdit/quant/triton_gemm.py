"""What tqdit's Triton GEMM kernels share (:mod:`tqdit.quant.int8_gemm`, :mod:`tqdit.quant.fp8_gemm`):
the grouped order of output tiles, the autotuner over a list of tilings, and the launch."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with CUDA builds of PyTorch
    triton = None


def autotuned(kernel, configs: list[dict], key: list[str]):
    """``kernel`` autotuned over ``configs`` (upper-case keys: the kernel's block sizes; num_warps,
    num_stages and an optional maxnreg: launch settings), once per value of the ``key`` arguments."""
    return triton.autotune(
        configs=[triton.Config({k: v for k, v in c.items() if k.isupper()}, num_warps=c["num_warps"], num_stages=c["num_stages"],
                               maxnreg=c.get("maxnreg")) for c in configs],
        key=key,
    )(kernel)


def run(kernel, autotuned_kernel, m: int, n: int, args: tuple, flags: dict, config: dict | None) -> None:
    """Launch one program per (BLOCK_M, BLOCK_N) output tile: ``autotuned_kernel`` where ``config`` is
    None, else ``kernel`` with that one tiling (e.g. the small one Triton's interpreter runs)."""
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        autotuned_kernel[grid](*args, **flags)
    else:
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        kernel[grid](*args, **flags, **config)


if triton is not None:

    @triton.jit
    def tile_rows_and_columns(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """The output rows and columns of this program's tile. Tiles go in grouped order: GROUP_M row
        tiles in turn take each column tile, so they share its weight tile while it is in L2."""
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
        tile_n = (pid % (GROUP_M * tiles_n)) // group_size
        return tile_m * BLOCK_M + tl.arange(0, BLOCK_M), tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
