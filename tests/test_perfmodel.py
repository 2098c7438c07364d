"""The performance model's arithmetic against the independently computed roofline table
(../shared/research/performance.md §2, bf16, H100 ceilings 790 TFLOP/s and 3.0 TB/s)."""
import pytest

from fastvlm import perfmodel

H100 = perfmodel.DEVICES["H100"]

# shape builder -> (GFLOP, minimal MB, roofline bound in µs) from the research table
EXPECTED = [
    (lambda: perfmodel.llava(1), 24.18, 47.86, 30.6),
    (lambda: perfmodel.llava(8), 193.4, 89.15, 244.8),
    (lambda: perfmodel.llava(64), 1547, 419.5, 1958.7),
    (lambda: perfmodel.gemma3(64), 97.01, 693.8, 231.3),
    (lambda: perfmodel.clip_patch(8), 5.59, 17.26, 7.07),
    (lambda: perfmodel.qwen2vl_merger(16384), 365.4, 160.5, 462.5),
    (lambda: perfmodel.perceiver(8), 784.4, 1354.9, 992.9),
]


@pytest.mark.parametrize("build,gflop,min_mb,bound_us", EXPECTED)
def test_matches_research_roofline(build, gflop, min_mb, bound_us):
    r = build().row(H100)
    # the model counts GEMM and attention FLOPs only (no norm or pooling arithmetic): within 1.5%
    assert r["gflop"] == pytest.approx(gflop, rel=0.015)
    assert r["min_mb"] == pytest.approx(min_mb, rel=0.01)
    assert r["roofline_us"] == pytest.approx(bound_us, rel=0.015)


def test_grid_arithmetic():
    # the pointer core: one CTA per 128x128 tile
    g = perfmodel.Gemm("fc2", 576, 4096, 4096)
    assert g.ctas == 160  # 576 / 128 = 5 row tiles (4.5 rounded up) x 4096 / 128 = 32 column tiles
    assert g.fill(132) == pytest.approx(160 / 264)  # two waves, the second 28/132 full
    # the TMA core (LLaVA's dense GEMMs): 132 tiles in one data-parallel wave, the other 28 split 4-way over K,
    # 112 ranges of a quarter tile each: 1.25 tile-times for 160/132 tiles of work
    r = perfmodel.llava(1).row(H100)
    assert r["ctas"] == 160 and r["waves"] == pytest.approx(160 / 132)
    assert r["fill"] == pytest.approx(160 / (132 * 1.25))
    assert r["fill_ok"]
    fc2 = perfmodel.llava(1).gemms[1]
    assert fc2.split_partials == 2 * 28 * 4 * 128 * 128 * 4


def test_pooled_reread_and_extra_passes_are_counted():
    raw = 64 * 4096 * 1152 * 2
    # N = 128 (one N tile): the mean A-load reads the 16 source rows of each pooled row once; statistics pass
    one = perfmodel.gemma3(64, N=128)
    assert one.gemms[0].a_bytes == raw and one.extra == {"norm stats pass": raw}
    # N = 2560: pool first, then the plain GEMM on rows 16x smaller
    g = perfmodel.gemma3(64)
    r = g.row(H100)
    assert g.gemms[0].q == 1 and r["l2_x"] == pytest.approx(1.0)
    assert r["design_mb"] == pytest.approx(r["min_mb"] + 3 * raw / 16 / 1e6)
    assert r["bytes_ok"]


def test_model_never_beats_roofline_and_h200_is_not_slower():
    for m in perfmodel.canonical():
        a, b = m.row(H100), m.row(perfmodel.DEVICES["H200"])
        assert a["model_us"] >= a["roofline_us"] * (1 - 1e-9)
        assert b["model_us"] <= a["model_us"] * (1 + 1e-9)


def test_cli_prints_both_devices(capsys):
    assert perfmodel.main([]) == 0
    out = capsys.readouterr().out
    assert "H100" in out and "H200" in out and "a model, not a measurement" in out


def test_fastvlm_model_command(capsys):
    from fastvlm.cli import main

    assert main(["model", "--device", "H200", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| Gemma 3-4B B=64 |" in out


def test_qformer_follows_the_linear_norm_and_fp32_designs():
    """The Q-Former row uses the kernels' own constants: linear_norm's variant rule and split tile, the fp32 GEMM
    tile; at B = 8 the dense + residual + LayerNorm GEMMs are split (4 x 24 = 96 CTAs, 73% fill, was 4 CTAs)."""
    from fastvlm.kernels import gemm_configs, linear_norm, linear_norm_split

    assert perfmodel.FP32_TILE == gemm_configs.FP32_GEMM_CONFIGS[0][:2]
    assert perfmodel.LN_SPLIT_BLOCK_N == linear_norm_split.SPLIT_CONFIGS[0][1]
    assert perfmodel.LN_FIN_N == linear_norm_split.FIN_N_MAX and perfmodel.LN_BLOCK_M == linear_norm.BLOCK_M
    assert perfmodel.LN_SINGLE_PASS_MIN_FILL == linear_norm.SINGLE_PASS_MIN_FILL
    for M in (32, 256, 64 * 132, 64 * 133, 64 * 250):
        assert perfmodel.linear_norm_split(M, 132) == (linear_norm.single_pass_fill(M, 132)
                                                       < linear_norm.SINGLE_PASS_MIN_FILL)
    m = perfmodel.qformer(8)
    ln = [g for g in m.gemms if "LN" in g.name]
    assert len(ln) == 3 and all(g.ctas == 96 and g.fill(132) == pytest.approx(96 / 132) for g in ln)
    ws = 2 * 24 * 256 * 4 * (1 + 3)  # [2, 24 tiles, 256 rows] fp32: written once, read by 3 column programs
    assert m.extra["linear_norm split: row statistics"] == 30 * ws  # 12 self + 6 cross + 12 FFN outputs
    assert 0.70 < m.fill(H100) < 0.85  # qkv (55%) and the cross-attention query GEMM (18%) keep it under target
