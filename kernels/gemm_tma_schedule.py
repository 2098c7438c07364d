"""Tile configurations and the persistent schedule of the TMA GEMM core (kernels/gemm_tma.py): pure arithmetic, no
triton import, so fastvlm/perfmodel.py models the same grid the launcher runs."""
from __future__ import annotations


def _cdiv(a, b):
    return -(-a // b)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). 8 warps = two consumer warpgroups of 64 rows each.
# 256x128 (two warpgroups of 128 rows) spilled 16-40 B with the GELU + pre-activation epilogue (sm_90a audit), so
# 128x256 is the one wide tile.
TMA_CONFIGS = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 128, 64, 4, 4),
]
# Model efficiency of one tile's main loop relative to the tensor-core peak (a larger tile reuses each loaded byte
# more): a choice rule until GPU timings replace it, not a measurement.
TILE_EFFICIENCY = {(128, 256): 0.85, (128, 128): 0.75, (64, 128): 0.55}
MIN_K_TILES_PER_SPLIT = 4  # a K range shorter than 4 x BLOCK_K cannot fill the pipeline
MAX_SPLIT = 8
TAIL_SPLIT_BELOW = 0.85  # split the last wave's tiles when they fill less than this share of the SMs
H100_SMS = 132
# tiles for variants whose A passes through registers (the norm prologue); 128x256 compiles with 0 spills at 248-255
# registers on triton 3.6 and 3.8 (sm_90a audit, LayerNorm + GELU, with and without the split tail)
NORM_CONFIGS = {(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)}
SMEM_LIMIT = 232448


def epi_split(config):
    """2 when the epilogue runs on two column halves of the tile (tiles above 128x128: the whole 128x256 fp32
    accumulator plus the epilogue's temporaries spilled in the audit), else 1."""
    return 2 if config[0] * config[1] > 128 * 128 else 1


def config_ok(config, norm, elem_bytes=2):
    bm, bn, bk, _, stages = config
    if norm != "none" and tuple(config) not in NORM_CONFIGS:
        return False
    return stages * (bm * bk + bn * bk) * elem_bytes <= SMEM_LIMIT - 32 * 1024


def schedule(M, N, K, config, sms=H100_SMS):
    """The persistent grid of ``config``: (programs, dp_tiles, split, k_tiles_per_split, tiles, modelled time in
    tile-main-loop units). Whole waves run data-parallel; a last wave filling under TAIL_SPLIT_BELOW of the SMs is
    split over K so its tiles' ranges fill them."""
    bm, bn, bk = config[:3]
    tiles = _cdiv(M, bm) * _cdiv(N, bn)
    k_tiles = max(1, _cdiv(K, bk))
    waves, tail = divmod(tiles, sms)
    split = 1
    if tail and tail < TAIL_SPLIT_BELOW * sms:
        split = max(1, min(sms // tail, k_tiles // MIN_K_TILES_PER_SPLIT, MAX_SPLIT))
    kps = _cdiv(k_tiles, split)
    split = _cdiv(k_tiles, kps)  # no empty range
    dp = tiles - tail if split > 1 else tiles
    units = dp + (tiles - dp) * split
    programs = min(sms, units)
    if split > 1:
        cost = waves + _cdiv(tail * split, sms) * kps / k_tiles
    else:
        cost = _cdiv(tiles, sms)
    eff = TILE_EFFICIENCY.get((bm, bn), 0.5)
    t = cost * bm * bn / eff  # tile-time units (K is common to all configs)
    return programs, dp, split, kps, tiles, t


def choose(M, N, K, norm, sms=H100_SMS, elem_bytes=2):
    """The config with the least modelled time, and its schedule."""
    best = None
    for cfg in TMA_CONFIGS:
        if not config_ok(cfg, norm, elem_bytes):
            continue
        sch = schedule(M, N, K, cfg, sms)
        if best is None or sch[-1] < best[1][-1]:
            best = (cfg, sch)
    return best
