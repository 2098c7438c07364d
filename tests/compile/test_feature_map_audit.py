"""The feature-map GEMM variants (NCHW flatten and pooled reads, a_mode "separable" / "separable_mean") compile for
sm_90a with wgmma, no spills and shared memory within the H100 limit, at every tile the autotuner may launch for
them. A child process without TRITON_INTERPRET compiles only these cases (the full audit is test_sm90_audit.py)."""
import json
import os
import subprocess
import sys

_SCRIPT = """
import json
from fastvlm.audit import compile_case
from fastvlm.kernels import gemm
print(json.dumps([compile_case(c) for c in gemm.audit_cases() if c["name"].startswith("fused_linear[nchw")]))
"""


def test_feature_map_variants_reach_wgmma_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = json.loads(res.stdout.strip().splitlines()[-1])
    names = [r["name"] for r in reports]
    assert any("nchw_avgpool" in n for n in names) and any("nchw_flatten" in n for n in names)
    assert not any("nchw_avgpool" in n and "128x64x64 w4" in n for n in names)  # pruned: it spilled
    for r in reports:
        assert r["ok"] and r["wgmma"] and r["spill_bytes"] == 0 and r["shared_bytes"] <= 232448, r
