"""One rank of the vLLM plugin's tensor-parallel tests (tests/test_vllm_plugin.py), run in its own process.

Each rank joins vLLM's distributed environment over gloo (``init_distributed_environment`` /
``initialize_model_parallel`` under a ``VllmConfig`` context, as vLLM's own tests do), builds vLLM's connector modules
on CPU, loads the same full random weights through vLLM's weight loaders (each rank keeps its shard), and compares
on fresh inputs: the plugin's forward, vLLM's own forward and a float64 reference computed from the full weights.
Results go to ``<out>/rank<r>.json``; a failed check raises (the parent shows the traceback).
"""
from __future__ import annotations

import json
import logging
import os
from functools import partial

import torch

from fastvlm.testing import rel_err, tolerance

D, H, O = 48, 64, 40  # vision width, hidden (split over ranks), output
CTX = 24  # Qwen-VL's patch width (merged width 4 * 24)
TEXT = dict(hidden_size=O, num_attention_heads=4, num_key_value_heads=4, head_dim=O // 4)
SIDE, WIN = 8, 2  # Idefics3 / Gemma 3: an 8x8 patch grid, 2x2 pixel shuffle or 2x2 average pooling
INPUT_NAME = {"llava": "image_features", "qwen2_vl": "x", "qwen2_5_vl": "x", "idefics3": "image_hidden_states",
              "gemma3": "vision_outputs"}


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _full_weights(mod, gen, dtype):
    """Random full (unsharded) weights for every parameter, loaded through vLLM's weight loaders: each rank narrows
    them to its own shard. Returns the full float32 tensors by parameter name."""
    full_shapes = {}
    for lname, lin in mod.named_modules():
        if hasattr(lin, "input_size") and hasattr(lin, "output_size"):  # vLLM's linears: sizes before the split
            full_shapes[f"{lname}.weight"] = (lin.output_size, lin.input_size)
            full_shapes[f"{lname}.bias"] = (lin.output_size,)
    full = {}
    for name, p in mod.named_parameters():
        shape = full_shapes.get(name, tuple(p.shape))
        w = torch.randn(shape, generator=gen) * (0.5 if p.dim() == 2 else 0.2)
        if "ln_q" in name and name.endswith("weight"):
            w = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        full[name] = w
        loader = getattr(p, "weight_loader", None)
        if loader is not None:
            loader(p, w.to(dtype))
        else:
            with torch.no_grad():
                p.copy_(w.to(dtype))
    return full


def _reference64(case, full, x):
    """float64 reference from the full weights."""
    x = x.double()
    f = {k: v.double() for k, v in full.items()}
    if case == "llava":
        h = torch.nn.functional.gelu(x @ f["linear_1.weight"].T + f["linear_1.bias"])
        return h @ f["linear_2.weight"].T + f["linear_2.bias"]
    if case in ("idefics3", "gemma3"):
        B = x.shape[0]
        grid = x.reshape(B, SIDE, SIDE, D)
        windows = [grid[:, di::WIN, dj::WIN] for di in range(WIN) for dj in range(WIN)]  # [B, 4, 4, D] each
        if case == "idefics3":  # merged feature order: window row di, then column dj, then the channel
            a = torch.cat(windows, dim=-1).reshape(B, -1, WIN * WIN * D)
            return a @ f["modality_projection.proj.weight"].T
        a = torch.stack(windows).mean(0).reshape(B, -1, D)
        an = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + f["mm_soft_emb_norm.weight"])
        return an @ f["mm_input_projection_weight"]
    if case == "qwen2_vl":
        xn = torch.nn.functional.layer_norm(x, (CTX,), f["ln_q.weight"], f["ln_q.bias"], 1e-6)
    else:
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * f["ln_q.weight"]
    a = xn.reshape(-1, 4 * CTX)
    h = torch.nn.functional.gelu(a @ f["mlp.0.weight"].T + f["mlp.0.bias"])
    return h @ f["mlp.2.weight"].T + f["mlp.2.bias"]


def _build(case, dtype):
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.models.llava import LlavaMultiModalProjector
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VisionPatchMerger
    from vllm.model_executor.models.qwen2_vl import Qwen2VisionPatchMerger

    torch.set_default_dtype(dtype)  # vLLM creates parameters in the default dtype (the model's dtype)
    try:
        if case == "llava":
            return LlavaMultiModalProjector(D, H, "gelu", True, prefix="multi_modal_projector")
        if case == "qwen2_vl":
            return Qwen2VisionPatchMerger(O, CTX, prefix="visual.merger")
        if case == "qwen2_5_vl":
            return Qwen2_5_VisionPatchMerger(O, CTX, norm_layer=partial(RMSNorm, eps=1e-6), prefix="visual.merger")
        if case == "idefics3":
            from transformers import Idefics3Config
            from vllm.model_executor.models.idefics3 import Idefics3Connector

            cfg = Idefics3Config(vision_config=dict(hidden_size=D), text_config=TEXT, scale_factor=WIN)
            return Idefics3Connector(cfg, prefix="model.connector")
        from transformers import Gemma3Config
        from vllm.model_executor.models.gemma3_mm import Gemma3MultiModalProjector

        cfg = Gemma3Config(vision_config=dict(hidden_size=D, image_size=SIDE * 14, patch_size=14, layer_norm_eps=1e-6),
                           text_config=TEXT, mm_tokens_per_image=(SIDE // WIN) ** 2)
        return Gemma3MultiModalProjector(cfg)
    finally:
        torch.set_default_dtype(torch.float32)


def _input(case, dtype, gen):
    """A fresh random input, as a strided view into a NaN-poisoned buffer (a read outside it shows up as NaN)."""
    shape = {"llava": (3, 8, D), "qwen2_vl": (32, CTX), "qwen2_5_vl": (32, CTX)}.get(case, (2, SIDE * SIDE, D))
    buf = torch.full((*shape[:-1], shape[-1] + 5), float("nan"), dtype=dtype)
    buf[..., 2:2 + shape[-1]] = torch.randn(shape, generator=gen).to(dtype)
    return buf[..., 2:2 + shape[-1]]


def check(case, dtype, backend, lines):
    from fastvlm.integrations import vllm_plugin

    rank, tp = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mod = _build(case, dtype)
    gen = torch.Generator().manual_seed(1234)  # the same full weights and input on every rank
    full = _full_weights(mod, gen, dtype)
    plan, reasons = vllm_plugin.decision(mod)
    assert plan is not None, reasons
    x = _input(case, dtype, gen)
    original = type(mod)._fastvlm_vllm_original_forward
    if case == "idefics3":  # vLLM's pixel shuffle views its input: a strided one is its error, through the plugin too
        for fn in (lambda: original(mod, x), lambda: mod(x)):
            try:
                fn()
                raise AssertionError("a strided input was accepted")
            except RuntimeError as exc:
                assert "view size is not compatible" in str(exc), exc
        x = x.contiguous()
    with torch.no_grad():
        ref_vllm = original(mod, x)
        os.environ["FASTVLM_BACKEND"] = backend
        out = mod(x)
        out_kw = mod(**{INPUT_NAME[case]: x})  # the argument by keyword
        os.environ.pop("FASTVLM_BACKEND")
    assert torch.equal(out, out_kw), "the fused forward called by keyword differs"
    ref = _reference64(case, full, x)
    k = {"llava": max(D, H), "idefics3": WIN * WIN * D, "gemma3": D}.get(case, 4 * CTX)
    # roundings: activation, output (+ each rank's partial sum before the all-reduce, + the norm's output)
    bound = tolerance(dtype, k, roundings=2 + (tp > 1) + (case != "llava"))  # (+ Gemma's pooled rows: its norm)
    e_fused, e_vllm, e_pair = rel_err(out, ref), rel_err(ref_vllm, ref), rel_err(out, ref_vllm)
    assert out.shape == ref_vllm.shape and out.dtype == ref_vllm.dtype, (out.shape, ref_vllm.shape, out.dtype)
    assert torch.isfinite(out).all(), "NaN/Inf in the fused output (a read outside the input?)"
    assert e_vllm <= bound, f"{case}: vLLM's own forward vs float64 {e_vllm:.3g} > {bound:.3g} (reference wrong?)"
    assert e_fused <= bound, f"{case} {dtype} {backend} tp{tp}: fused vs float64 {e_fused:.3g} > {bound:.3g}"
    assert e_pair <= 2 * bound, f"{case}: fused vs vLLM {e_pair:.3g} > {2 * bound:.3g}"
    assert any(case_name(case) in line and "fused" in line for line in lines), lines
    return dict(case=case, dtype=str(dtype), backend=backend, tp=tp, rank=rank, rel_err_fused=e_fused,
                rel_err_vllm=e_vllm, rel_err_pair=e_pair, bound=bound, plan=plan.description)


def case_name(case):
    return {"llava": "LlavaMultiModalProjector", "qwen2_vl": "Qwen2VisionPatchMerger",
            "qwen2_5_vl": "Qwen2_5_VisionPatchMerger", "idefics3": "Idefics3Connector",
            "gemma3": "Gemma3MultiModalProjector"}[case]


def check_left_alone(lines):
    """A quantized linear and a weight repacked by vLLM's CPU GEMM dispatch: left to vLLM, with the reason."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    from fastvlm.integrations import vllm_plugin

    mod = _build("llava", torch.float32)
    gen = torch.Generator().manual_seed(7)
    _full_weights(mod, gen, torch.float32)
    x = _input("llava", torch.float32, gen)
    with torch.no_grad():
        want = type(mod)._fastvlm_vllm_original_forward(mod, x)

    class StandInQuantMethod(QuantizeMethodBase):  # any quant method other than UnquantizedLinearMethod
        def __init__(self, inner):
            self.inner = inner

        def create_weights(self, *args, **kwargs):
            raise AssertionError("not called")

        def apply(self, layer, x, bias=None):
            return self.inner.apply(layer, x, bias)

    unquantized = mod.linear_2.quant_method
    mod.linear_2.quant_method = StandInQuantMethod(unquantized)
    plan, reasons = vllm_plugin.decision(mod)
    assert plan is None and any("linear_2 is quantized (StandInQuantMethod)" in r for r in reasons), reasons
    with torch.no_grad():
        got = mod(x)
    assert torch.equal(got, want), "a module left to vLLM must run vLLM's forward"
    assert any("left to vLLM" in line and "quantized" in line for line in lines), lines
    mod.linear_2.quant_method = unquantized
    result = {"quantized_reason": reasons}
    # vLLM's CPU platform packs an unquantized weight after loading (dispatch_cpu_unquantized_gemm with
    # remove_weight=True): the GEMM runs through layer.cpu_linear and layer.weight is left empty. The CUDA wheel here
    # has no CPU kernels, so the same state is set up the way that function leaves it.
    from vllm.model_executor.layers.utils import cpu_unquantized_gemm

    lin = mod.linear_1
    packed = lin.weight.detach().clone()
    lin.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, packed, bias)
    lin.quant_method._gemm_impl = cpu_unquantized_gemm
    lin.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    plan, reasons = vllm_plugin.decision(mod)
    assert plan is None and any("linear_1.weight is (0,)" in r and "repacked" in r for r in reasons), reasons
    with torch.no_grad():
        got = mod(x)
    assert torch.equal(got, want), "a module with a repacked weight must run vLLM's forward"
    result["repacked_reason"] = reasons
    return result


def main(rank, world, port, out_dir, cases):
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    from fastvlm.integrations import vllm_plugin

    handler = _Lines()
    logging.getLogger("vllm.fastvlm").addHandler(handler)
    logging.getLogger("vllm.fastvlm").setLevel(logging.INFO)  # vLLM sets its loggers' level when an engine starts
    results = []
    # the CUDA wheel on a machine without a GPU: vLLM's platform is UnspecifiedPlatform, and VllmConfig() raises
    # "RuntimeError: Failed to infer device type"; the device is named instead
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(tensor_model_parallel_size=world)
        vllm_plugin.register()
        try:
            for case, dtype, backend in cases:
                if case == "left_alone":
                    results.append(check_left_alone(handler.lines))
                else:
                    results.append(check(case, getattr(torch, dtype), backend, handler.lines))
        finally:
            vllm_plugin.unregister()
            destroy_model_parallel()
            destroy_distributed_environment()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(results=results, log=handler.lines), f, indent=1)
