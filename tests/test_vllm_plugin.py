"""fastvlm's vLLM plugin (fastvlm/integrations/vllm_plugin.py) against vLLM's own connector modules.

Needs vLLM, which pins its own torch and transformers: these tests run in the environment that ``.ci/vllm`` builds
and are skipped elsewhere. Each tensor-parallel case runs in fresh processes (one per rank, gloo backend, vLLM's
``init_distributed_environment`` / ``initialize_model_parallel``): tests/vllm_tp_worker.py.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: build its environment and run these tests with "
                                   ".ci/vllm (vLLM pins its own torch/transformers)")

import torch.multiprocessing as mp  # noqa: E402

import vllm_tp_worker  # noqa: E402  (tests/ is on sys.path: conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(world, cases, tmp_path):
    """Run ``cases`` on ``world`` ranks; returns each rank's results."""
    mp.start_processes(vllm_tp_worker.main, args=(world, _port(), str(tmp_path), cases), nprocs=world,
                       start_method="spawn", join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3")
CASES = [(case, dtype, "torch") for case in FAMILIES for dtype in ("float32", "bfloat16")]
# the Triton kernels themselves (interpreter on CPU): one dtype per family keeps the suite short
TRITON = [("llava", "float32", "triton"), ("qwen2_vl", "bfloat16", "triton"), ("qwen2_5_vl", "float32", "triton"),
          ("idefics3", "bfloat16", "triton"), ("gemma3", "float32", "triton")]


@pytest.mark.parametrize("world", [1, 2], ids=["tp1", "tp2"])
def test_fused_forward_equals_vllm(world, tmp_path):
    """The plugin's forward equals vLLM's own forward (and a float64 reference of the full weights) on every rank,
    with tensor-parallel groups of 1 and 2: the fused op on the local shards, vLLM's all-reduce after it."""
    ranks = _ranks(world, CASES + TRITON + [("left_alone", "float32", "torch")], tmp_path)
    for r, got in enumerate(ranks):
        fused = [res for res in got["results"] if "case" in res]
        assert len(fused) == len(CASES + TRITON)
        for res in fused:
            assert res["tp"] == world and res["rank"] == r
            if world > 1 and res["case"] in ("llava", "qwen2_vl", "qwen2_5_vl"):  # the others: replicated weights
                assert "tensor-parallel rank" in res["plan"] and "all-reduce kept" in res["plan"], res["plan"]
        assert any("fused connector forward installed" in line for line in got["log"]), got["log"]
    if world == 2:  # every rank returns the whole (all-reduced) output: the same numbers on both
        for a, b in zip(ranks[0]["results"], ranks[1]["results"]):
            if "case" in a:
                assert a["rel_err_fused"] == pytest.approx(b["rel_err_fused"], rel=1e-6), (a, b)


def _run(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)


def test_entry_point_and_switch():
    """pyproject's vllm.general_plugins entry point is what vLLM's loader calls; FASTVLM_VLLM=0 switches it off."""
    code = """
import logging
logging.basicConfig(level=logging.INFO)  # vLLM configures its own logging when an engine starts, not on import
import vllm.plugins as P
from vllm.model_executor.models.llava import LlavaMultiModalProjector as L
P.load_general_plugins()
print("PATCHED" if hasattr(L, "_fastvlm_vllm_original_forward") else "UNPATCHED")
"""
    on = _run(code, VLLM_LOGGING_LEVEL="INFO")
    assert on.returncode == 0, on.stderr[-3000:]
    assert "PATCHED" in on.stdout.split(), on.stdout + on.stderr[-3000:]
    assert "fused connector forward installed" in on.stdout + on.stderr
    off = _run(code, FASTVLM_VLLM="0", VLLM_LOGGING_LEVEL="INFO")
    assert off.returncode == 0, off.stderr[-3000:]
    assert "UNPATCHED" in off.stdout.split(), off.stdout
    assert "switched off" in off.stdout + off.stderr


def test_register_is_idempotent_and_reversible():
    from fastvlm.integrations import vllm_plugin
    from vllm.model_executor.models.llava import LlavaMultiModalProjector as L

    before = L.forward
    try:
        first = vllm_plugin.register()
        assert "LlavaMultiModalProjector" in first
        assert vllm_plugin.register() == []  # vLLM may load plugins more than once per process
    finally:
        vllm_plugin.unregister()
    assert L.forward is before
