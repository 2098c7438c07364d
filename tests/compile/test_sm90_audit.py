"""Every kernel x autotune config compiles for sm_90a: shared memory within the H100 limit, no spills, wgmma in the
GEMM tiles. Runs ``python -m fastvlm.audit --json`` in a child process without TRITON_INTERPRET (the interpreter,
which conftest turns on for this process, would make compilation fail)."""
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


def test_every_case_compiles(reports):
    from fastvlm.kernels import gemm

    names = [r["name"] for r in reports]
    assert sum(n.startswith("fused_linear") for n in names) >= len(gemm.GEMM_CONFIGS) * 3
    assert any(n.startswith("row_stats") for n in names)
    assert any(n.startswith("attention[bf16 q32x2h d64") for n in names)
    # 32 BLIP-2 queries x 2 packed heads make a 64-row tile that reaches wgmma
    assert all(r["wgmma"] for r in reports if r["name"].startswith("attention[bf16 q32x2h"))


def test_resources(reports):
    for r in reports:
        assert r["shared_bytes"] <= 232448, r
        assert r["spill_bytes"] == 0, r
        if r["expect_mma"]:
            assert r["wgmma"], f"{r['name']} does not use wgmma"
