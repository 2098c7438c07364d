"""Every kernel x autotune config compiles for sm_90a: shared memory within the H100 limit, no spills, wgmma in the
GEMM tiles. Runs ``python -m fastvlm.audit --json`` in a child process without TRITON_INTERPRET (the interpreter,
which conftest turns on for this process, would make compilation fail).

Marked slow (about 3 minutes on 2 cores with a cold Triton cache before issue 12 added the fp32 GEMM and split
linear_norm cases: 245 cases now, an estimated 6-8 minutes): ``.ci/run`` runs it as its own step after the
default suite; locally ``python -m pytest -m slow tests/compile/test_sm90_audit.py`` or ``fastvlm audit``."""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "fastvlm.audit", "--json"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode in (0, 1), res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_case_compiles(reports):
    from fastvlm.kernels import gemm

    names = [r["name"] for r in reports]
    assert sum(n.startswith("fused_linear") for n in names) >= len(gemm.GEMM_CONFIGS) * 3
    assert any(n.startswith("row_stats") for n in names)
    assert any(n.startswith("attention[bf16 q32x2h d64") for n in names)
    # 32 BLIP-2 queries x 2 packed heads make a 64-row tile that reaches wgmma
    assert all(r["wgmma"] for r in reports if r["name"].startswith("attention[bf16 q32x2h"))


@pytest.mark.slow
def test_resources(reports):
    for r in reports:
        assert r["shared_bytes"] <= 232448, r
        assert r["spill_bytes"] == 0, r
        if r["expect_mma"]:
            assert r["wgmma"], f"{r['name']} does not use wgmma"


@pytest.mark.slow
def test_fp32_and_split_linear_norm_variants(reports):
    """Issue 12: fp32 GEMM variants compile on tensor cores (tf32x3, every variant x fp32 row) and the "ieee" path on
    request compiles too, with 0 spills; both linear_norm variants (single pass, split tile + normalising launch)."""
    from fastvlm.kernels import gemm_configs

    fp32 = [r for r in reports if r["name"].startswith("fused_linear[fp32 tf32x3 ")]
    assert len({r["name"].split("]")[0] for r in fp32}) >= 16
    assert all(r["wgmma"] and r["spill_bytes"] == 0 for r in fp32)
    assert all(r["name"].split("] ")[1].split(" ")[0].endswith("x32") for r in fp32)
    ieee = [r for r in reports if r["name"].startswith("fused_linear[fp32 ieee ")]
    assert len(ieee) == len(gemm_configs.FP32_GEMM_CONFIGS) and all(r["spill_bytes"] == 0 for r in ieee)
    split = [r for r in reports if r["name"].startswith("linear_norm_split[")]
    assert {r["name"].split("]")[0] for r in split} == {"linear_norm_split[bf16 ieee", "linear_norm_split[fp32 tf32x3",
                                                         "linear_norm_split[fp32 tf32"}
    assert all(r["wgmma"] and r["spill_bytes"] == 0 and r["async_loads"] for r in split)
    assert any(r["name"].startswith("linear_norm_finish[fp32]") for r in reports)


@pytest.mark.slow
def test_pipelining_report(reports):
    """The audit reports, per case, whether the main loop's tiles arrive by asynchronous copies and whether wgmma
    keeps a group in flight. The dense GEMM (plain strided A) must do both in every config; the summary line lists
    the variants that do not (issue 12's target: every A-mode)."""
    from fastvlm.audit import summary

    dense = [r for r in reports if r["name"].startswith("fused_linear[linear_gelu+pre]")]
    assert dense
    for r in dense:
        assert r["async_loads"] and r["loop_sync_tile_loads"] == 0, r
        assert r["wgmma_in_flight"], r
    tma = [r for r in reports if r["name"].startswith("tma_linear[")]
    assert tma
    for r in tma:  # the Hopper core: TMA bulk copies, the main loop all asynchronous, wgmma overlapped
        assert r["tma"] and r["async_loads"] and r["wgmma_in_flight"], r
    line = summary(reports)
    assert line.startswith("pipelining: ")
    for r in reports:
        if r["expect_mma"] and not r["async_loads"]:
            assert r["name"].split("]")[0] + "]" in line


def test_loop_load_parser():
    from fastvlm.audit import loop_loads

    ttgir = "\n".join([
        "%x = tt.load %p : tensor<64x64x!tt.ptr<bf16>, #blocked>",  # outside any loop: not counted
        "%r:2 = scf.for %i = %c0 to %K step %c64 iter_args(%a = %z) -> (tensor<64x64xf32>) : i32 {",
        "  %c = ttg.async_copy_global_to_local %pa, %sa mask %m : tensor<64x64x!tt.ptr<bf16>, #b> -> <64x64xbf16>",
        "  %v = tt.load %pv, %mv : tensor<64x!tt.ptr<f32>, #s>",  # a vector: not a tile
        "  %s:1 = scf.for %q = %c0 to %Q step %c1 iter_args(%b = %z) -> (tensor<64x64xf32>) : i32 {",
        "    %t = tt.load %pt, %mt : tensor<64x64x!tt.ptr<bf16>, #blocked>",  # a synchronous tile load
        "    scf.yield %t",
        "  }",
        "  scf.yield %c",
        "}",
        "%y = tt.load %p : tensor<64x64x!tt.ptr<bf16>, #blocked>",
    ])
    assert loop_loads(ttgir) == (1, 1)
    # a persistent kernel: the tile loop holds the K loop (the dot, TMA loads) and the epilogue's loads, which are
    # not main-loop loads; a loop nested in the K loop (a pooled A's window) still counts
    persistent = "\n".join([
        "scf.for %u = %p to %U step %P : i32 {",
        "  %acc = scf.for %k = %c0 to %K step %c1 iter_args(%a = %z) -> (tensor<128x128xf32>) : i32 {",
        "    %x = ttng.async_tma_copy_global_to_local %d[%m, %k] %buf, %bar, %t : !tt.tensordesc<> -> <128x64xbf16>",
        "    %w = scf.for %q = %c0 to %Q step %c1 iter_args(%b = %z) -> (tensor<64x128xf32>) : i32 {",
        "      %t = tt.load %pt, %mt : tensor<64x128x!tt.ptr<bf16>, #blocked>",
        "      scf.yield %t",
        "    }",
        "    %d = ttng.warp_group_dot %x, %w, %a : tensor<128x64xbf16> * tensor<64x128xbf16> -> tensor<128x128xf32>",
        "    scf.yield %d",
        "  }",
        "  scf.for %s = %c1 to %S step %c1 : i32 {",
        "    %p = tt.load %pp : tensor<128x128x!tt.ptr<f32>, #blocked>",
        "  }",
        "  %r = tt.load %pr, %mr : tensor<128x128x!tt.ptr<bf16>, #blocked>",
        "}",
    ])
    assert loop_loads(persistent) == (1, 1)
