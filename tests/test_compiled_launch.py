"""torch.compile launches the kernels itself: every fused module's compiled graph holds the Triton kernel calls
(the ops' triton_op twins, fastvlm.ops.compiled), and its launches pass the driver what the eager launches pass.

Runs tests/compiled_launch_check.py in a child process without TRITON_INTERPRET, on the host-only Triton driver
(kernels compiled for sm_90, no GPU; values are not computed, see tests/test_compiled_twins.py for those). The
default run covers the Qwen2-VL patch embedding and merger (norm statistics + two GEMMs; a training call too), the
hand-off, token pooling and the feature-map projector; slow-marked: a 2-layer Q-Former (attention, linear + LayerNorm, projections; training too) and the
sweep of every module of every tiny model.
"""
import json
import os
import subprocess
import sys

import pytest


def _run(families):
    pytest.importorskip("triton.backends.nvidia.driver")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVLM_BACKEND", "FASTVLM_STRICT",
                                                            "FASTVLM_COMPILE_LAUNCH")}
    script = os.path.join(os.path.dirname(__file__), "compiled_launch_check.py")
    res = subprocess.run([sys.executable, script, *families], env=env, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check(report):
    assert report
    for name, r in report.items():
        assert "error" not in r, f"{name}: {r.get('tb', r['error'])}"
        assert r["taken"] and all(t.endswith("_launch") for t in r["taken"]), (name, r)  # the twins, no opaque op
        # kernel calls in the graph, no custom op; Mistral 3's merge is sized by image_sizes.tolist() (a graph break,
        # then data-dependent sizes): its twin hands that call to the opaque op (symbolic shapes)
        allowed = ["fastvlm.mlp_projector.default"] if name.startswith("mistral3") else []
        assert r["fastvlm_ops"] == allowed and r["kernels"] == 1, (name, r)
        assert r["launches"] == r["eager_launches"] > 0 and r["same_args"], (name, r)
        if "train" in r:
            t = r["train"]
            assert t["fastvlm_ops"] == [] and t["kernels"] == 1 and t["backward_graphs"] == 1 and t["grads"], (name, t)


@pytest.fixture(scope="module")
def report():
    return _run(["qwen2_vl"])  # (the hand-off comes with every run)


def test_compiled_graphs_launch_the_kernels(report):
    assert {"qwen2_vl: PatchEmbed", "qwen2_vl: PatchMerger", "hand-off: image rows into inputs_embeds",
            "pool_tokens (mean)", "pool_tokens (max)", "feature_map_projector (pool 2)"} <= set(report), sorted(report)
    _check(report)
    assert report["qwen2_vl: PatchMerger"]["launches"] == 3  # norm statistics, two GEMMs
    assert "train" in report["qwen2_vl: PatchMerger"]


@pytest.mark.slow  # ~2 min on 2 cores
def test_compiled_qformer_launches_its_kernels():
    report = _run(["qformer"])
    _check(report)
    r = report["Q-Former 2 layers (BLIP-2 layout)"]
    assert set(r["taken"]) == {"fastvlm.attention_launch", "fastvlm.linear_residual_layernorm_launch",
                               "fastvlm.mlp_projector_launch"} and "train" in r, r


@pytest.mark.slow  # 10-35 min on 2 cores (load): every module of every tiny model, kernels compiled for sm_90
def test_every_fused_module_launches_its_kernels_compiled():
    report = _run([])
    _check(report)
    taken = {t for r in report.values() for t in r["taken"]}
    assert {"fastvlm.patch_embed_launch", "fastvlm.rows_embed_launch", "fastvlm.mlp_projector_launch",
            "fastvlm.attention_launch", "fastvlm.linear_residual_layernorm_launch", "fastvlm.norm_linear_launch",
            "fastvlm.scatter_image_features_launch", "fastvlm.pool_tokens_launch",
            "fastvlm.feature_map_projector_launch"} <= taken, sorted(taken)
