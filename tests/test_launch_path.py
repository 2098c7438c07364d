"""The launch path itself, on the host-only Triton driver (kernels compiled for sm_90, Triton's real Python launch
path, no GPU): a repeat call launches its plan directly (no JITFunction.run, autotuner or heuristics wrapper), makes
no host synchronisation (no aten op or tensor conversion that reads a value), launches the expected number of kernels,
survives plans built from several threads at once, and steps aside for launch hooks.

Runs tests/launch_path_check.py in a child process without TRITON_INTERPRET (conftest turns the interpreter on for
this process; compiling for sm_90 needs it off). About 30 s on 2 cores the first time (compiles), less after.
"""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton.backends.nvidia.driver")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVLM_BACKEND", "FASTVLM_STRICT")}
    script = os.path.join(os.path.dirname(__file__), "launch_path_check.py")
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# launches per call: projector 2 GEMMs; merger stats + 2 GEMMs; Q-Former (2 layers, cross-attention in the first):
# the image K/V GEMM, then per layer QKV GEMM, attention, dense+LN [, query GEMM, attention, dense+LN], FFN, out+LN,
# where each linear + LayerNorm at these small M is split over N: a tile GEMM, then the normalising launch
# (the modules with a chain: FusedLinear 1 GEMM, FastVLM's projector on a feature map's view 2, Idefics3's shuffle 1,
# Idefics2's gated MLP 2, VipLLaVA's norm statistics + 2)
CASES = {"llava": 2, "qwen2_vl": 3, "handoff": 1, "attention": 1, "linear_residual_layernorm": 2, "qformer": 19,
         "fused_linear": 1, "fast_vlm_map": 2, "idefics3": 1, "idefics2_mlp": 2, "vipllava": 3}


@pytest.mark.parametrize("case", list(CASES))
def test_repeat_call_is_one_direct_launch_per_kernel(report, case):
    r = report[case]
    assert r["launches"] == CASES[case], r
    assert r["slow_path"] == {}, f"{case}: a repeat call went through {r['slow_path']}"


@pytest.mark.parametrize("case", list(CASES))
def test_repeat_call_does_not_synchronise(report, case):
    assert report[case]["syncs"] == [], f"{case}: {report[case]['syncs']}"


def test_plans_built_from_threads(report):
    r = report["threads"]
    assert r["errors"] == [], r["errors"]
    assert r["launches"] >= 4 * 3 * 2, r  # 4 threads x 3 calls x 2 GEMMs (+ the autotuner's first runs)


def test_direct_launch_passes_what_compiled_kernel_run_passes(report):
    """The driver-level launch (triton 3.8) gets the same grid, function, metadata, annotations and arguments as
    Triton's own CompiledKernel.run path, for every case; on 3.8 every kernel here takes the direct launch."""
    import triton

    r = report["launch_paths"]
    assert r["mismatched"] == [], r
    if triton.__version__.startswith("3.8"):
        assert r["paths"] == ["direct"], r


def test_compiled_projector_graph_launches_the_kernels(report):
    """torch.compile(fullgraph=True): the graph holds the GEMM kernel calls themselves (triton_op + wrap_triton, so
    Inductor launches them), two launches per call passing the driver exactly what the eager launches pass (same
    compiled kernel, grid and arguments); FASTVLM_COMPILE_LAUNCH=op keeps the opaque custom op."""
    r = report["compiled"]
    assert r["inductor"]["calls"].count("triton_kernel_wrapper_functional") == 1, r  # (a set of call targets)
    assert not any("fastvlm.mlp_projector" in c for c in r["inductor"]["calls"]), r
    assert r["inductor"]["launches"] == 2 and r["inductor"]["same_args"], r
    assert "fastvlm.mlp_projector.default" in r["op"]["calls"], r
    assert "triton_kernel_wrapper_functional" not in r["op"]["calls"], r
    assert r["op"]["launches"] == 2 and r["op"]["same_args"], r


@pytest.mark.parametrize("case", ["fused_linear", "fast_vlm_map", "idefics3", "idefics2_mlp", "vipllava"])
def test_repeat_call_takes_the_chain_with_the_ops_arguments(report, case):
    """A module's repeat call launches its chain (fastvlm.ops._fast) and passes the driver what the op's path
    passes for the same call (same kernels, grids, integers; tensors pointing into the same memory)."""
    assert report["chains"][case] == dict(chain=True, same_args=True), report["chains"][case]


def test_launch_hooks_see_every_launch(report):
    assert report["hooked_launches"] == 2


def test_a_shared_plan_compiles_per_dtype(report):
    assert report["row_stats_x_types"] == ["*fp16", "*fp32"], report["row_stats_x_types"]


@pytest.mark.slow  # ~40 s: it times its rows
def test_bench_overhead_runs_on_cpu(tmp_path):
    """``fastvlm bench --overhead`` (it crashed with stale arguments once): the hand-off and GEMM rows, one round."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVLM_BACKEND", "FASTVLM_STRICT")}
    out = tmp_path / "rows.jsonl"
    res = subprocess.run([sys.executable, "-m", "fastvlm.cli", "bench", "--overhead", "--families", "none",
                          "--qformer-layers", "0", "--rounds", "1", "--json", str(out)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["case"].split(":")[0].split(" (")[0] for r in rows] == [
        "hand-off", "one fused GEMM launch", "one fused GEMM launch, an op's repeat call"]
    assert all(r["launches"] == 1 and r["fused_min_us"] > 0 and r["eager_min_us"] > 0 for r in rows), rows
