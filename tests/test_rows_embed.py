"""``fastvlm::rows_embed`` (Qwen-VL patch embedding on pre-patchified rows) and its Qwen3-VL pairing.

Covers: the weighted multi-row position epilogue of kernels/gemm.py (4 and 16 taps) under the interpreter with
poisoned margins; still-image mode (time-summed kernel, one frame read); gradients; opcheck and compile; errors;
the Qwen3-VL pairing in a patched model (interpolated positions fused into the patch GEMM, the parent's
``pos_embed`` lookup reduced to zeros) against the unpatched model, hooks, precomputed taps and unpatch.
"""
import pytest
import torch

import fastvlm
from fastvlm.kernels.gemm import fused_linear
from fastvlm.ops.rows_embed import _forward, first_frame, rows_embed
from fastvlm.testing import rel_err
from helpers import Guarded, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ref(x, w, b, pos, idx, tw):
    y = x.double() @ w.double().T + b.double()
    return y + (pos.double()[idx] * tw.double()[..., None]).sum(1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("taps", [4, 16])
def test_position_taps_epilogue(dtype, taps, triton_backend):
    """Ragged sizes (N = 37, K = 50, D = 40): the kernel's weighted sum of table rows, nothing written outside."""
    N, K, D, L = 37, 50, 40, 29
    x, w, b = torch.randn(N, K).to(dtype), (torch.randn(D, K) / K ** 0.5).to(dtype), torch.randn(D).to(dtype)
    pos = torch.randn(L, D).to(dtype)
    idx = torch.randint(0, L, (N, taps))
    tw = torch.rand(N, taps)
    out = Guarded((N, D), dtype, x.device)
    fused_linear(x, w, b, pos=pos, pos_rows=idx, pos_weights=tw, out=out.tensor, config=(16, 32, 16, 4, 1))
    out.check("out")
    assert_close(out.tensor, _ref(x, w, b, pos, idx, tw), dtype, K + taps)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_still_frames_equal_full_kernel(backend, dtype, monkeypatch):
    """Repeated frames: the first frame against the time-summed kernel equals the full GEMM (within rounding)."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    N, C, T, q, D = 23, 3, 2, 9, 24
    frame = torch.randn(N, C, 1, q)
    x = frame.expand(N, C, T, q).reshape(N, -1).to(dtype)
    w = (torch.randn(D, C, T, q) / (C * q) ** 0.5).to(dtype)
    b = torch.randn(D).to(dtype)
    ws = w.float().sum(2).to(dtype).reshape(D, -1)
    got = _forward(x, ws, b, None, None, None, T, q, w.reshape(D, -1), backend=backend)
    ref = x.double() @ w.reshape(D, -1).double().T + b.double()
    assert_close(got, ref, dtype, C * T * q, roundings=2)  # the summed kernel is rounded once more
    assert torch.equal(first_frame(x, T, q), frame.reshape(N, -1).to(dtype))


def test_gradients_match_reference(quiet_fallbacks):
    N, K, D, L = 11, 24, 8, 10
    x = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(L, D, dtype=torch.float64, requires_grad=True)
    idx, tw = torch.randint(0, L, (N, 4)), torch.rand(N, 4, dtype=torch.float64)
    g = torch.randn(N, D, dtype=torch.float64)
    got = torch.autograd.grad(rows_embed(x, w, b, pos=pos, pos_idx=idx, pos_weights=tw), (x, w, b, pos), g)
    ref = torch.autograd.grad(_ref(x, w, b, pos, idx, tw), (x, w, b, pos), g)
    for a, r in zip(got, ref):
        assert rel_err(a, r) < 1e-12


def test_still_gradients_of_the_summed_kernel():
    """In still mode the kernel gradient reaches the full Conv3d weight through the time sum."""
    N, C, T, q, D = 7, 3, 2, 4, 5
    x = torch.randn(N, C, 1, q, dtype=torch.float64).expand(N, C, T, q).reshape(N, -1)
    w = torch.randn(D, C, T, q, dtype=torch.float64, requires_grad=True)
    g = torch.randn(N, D, dtype=torch.float64)
    got, = torch.autograd.grad(rows_embed(x, w.sum(2).reshape(D, -1), frames=T, chunk=q,
                                          full_weight=w.reshape(D, -1)), w, g)
    ref, = torch.autograd.grad(x @ w.reshape(D, -1).T, w, g)
    assert rel_err(got, ref) < 1e-12


def test_opcheck_and_compile(torch_backend):
    N, K, D, L = 9, 12, 8, 6
    args = (torch.randn(N, K), torch.randn(D, K), torch.randn(D), torch.randn(L, D), torch.randint(0, L, (N, 4)),
            torch.rand(N, 4), 0, 0, None)
    torch.library.opcheck(torch.ops.fastvlm.rows_embed.default, args)
    still = (torch.randn(N, 2 * K), torch.randn(D, K), None, None, None, None, 2, 4, torch.randn(D, 2 * K))
    torch.library.opcheck(torch.ops.fastvlm.rows_embed.default, still)
    f = torch.compile(lambda x, w, b, p, i, t: rows_embed(x, w, b, pos=p, pos_idx=i, pos_weights=t),
                      fullgraph=True, backend="aot_eager")
    assert_close(f(*args[:6]), _ref(*args[:6]), torch.float32, K + 4)


def test_bad_inputs():
    x, w = torch.randn(4, 12), torch.randn(8, 12)
    with pytest.raises(ValueError, match="x must be \\[N, 12\\]"):
        rows_embed(torch.randn(4, 10), w)
    with pytest.raises(ValueError, match="pos needs int64 pos_idx"):
        rows_embed(x, w, pos=torch.randn(5, 8), pos_idx=torch.zeros(4, 4, dtype=torch.int32),
                   pos_weights=torch.rand(4, 4))
    with pytest.raises(IndexError, match="pos_idx holds rows 0..5 of a 5-row table"):
        rows_embed(x, w, pos=torch.randn(5, 8), pos_idx=torch.tensor([[0], [5], [1], [2]]),
                   pos_weights=torch.rand(4, 1))
    with pytest.raises(ValueError, match="with frames=2 and chunk=5"):
        rows_embed(torch.randn(4, 24), w, frames=2, chunk=5)
    with pytest.raises(ValueError, match="full_weight must be the kernel before its sum over time, \\[8, 24\\]"):
        rows_embed(torch.randn(4, 24), w, frames=2, chunk=4)


# --------------------------------------------------------------------------------- Qwen3-VL pairing and still mode

def _qwen3(backend_env, monkeypatch):
    from fastvlm.tiny_models import build_tiny_model

    monkeypatch.setenv("FASTVLM_BACKEND", backend_env)
    model, inputs = build_tiny_model("qwen3_vl")
    return model.eval(), inputs


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qwen3_positions_fused_in_patched_model(backend, monkeypatch, quiet_fallbacks):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, inputs = _qwen3(backend, monkeypatch)
    with torch.no_grad():
        ref = model(**inputs).logits
    report = fastvlm.patch(model, verify=True)
    row = [e for e in report.entries if e.path == "model.visual.pos_embed"]
    assert row and row[0].status == "patched" and "ok" in row[0].detail, str(report)
    visual = model.model.visual
    state = {k: v for k, v in model.state_dict().items()}
    with torch.no_grad(), fastvlm.trace() as t:
        out = model(**inputs).logits
    rec = [r for r in t.records if r.op == "fastvlm::rows_embed"]
    assert len(rec) == 1 and "+pos4" in rec[0].detail and rec[0].backend == backend, str(t)
    assert_close(out, ref, torch.float32, 1536, roundings=4)
    assert list(model.state_dict()) == list(state)
    # the fused patch embedding called on its own is the plain one (no positions): every module keeps its output
    w = visual.patch_embed.proj.weight
    x = torch.randn(8, w[0].numel())
    with torch.no_grad():
        plain = torch.nn.functional.linear(x.double(), w.double().reshape(w.shape[0], -1),
                                           visual.patch_embed.proj.bias.double())
        assert_close(visual.patch_embed(x), plain, torch.float32, x.shape[1])
    counts = fastvlm.unpatch(model)
    assert type(visual.pos_embed) is torch.nn.Embedding and "forward" not in visual.__dict__, counts
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_qwen3_pairing_steps_aside(monkeypatch, quiet_fallbacks):
    """A hook on pos_embed, or taps the caller precomputed: the parent's own code runs (and is exact)."""
    model, inputs = _qwen3("torch", monkeypatch)
    with torch.no_grad():
        ref = model(**inputs).logits
    fastvlm.patch(model)
    seen = []
    h = model.model.visual.pos_embed.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad(), fastvlm.trace() as t:
        out = model(**inputs).logits
    h.remove()
    assert seen and seen[0][-1] == model.model.visual.pos_embed.weight.shape[1]  # the real [N, taps, D] lookup
    assert all("+pos" not in r.detail for r in t.records if r.op == "fastvlm::rows_embed"), str(t)
    assert_close(out, ref, torch.float32, 1536, roundings=4)
    # the model's forward still accepts precomputed taps and uses them
    visual = model.model.visual
    grid = inputs["image_grid_thw"]
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights as taps

    idx, w = taps(grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                  align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
    px = inputs["pixel_values"]
    with torch.no_grad():
        a = visual(px, grid_thw=grid, interp_indices=idx, interp_weights=w).last_hidden_state
        b = visual(px, grid_thw=grid).last_hidden_state
    assert_close(a, b, torch.float32, 1536, roundings=4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_still_images_mode_on_the_module(backend, monkeypatch):
    """``fastvlm_still_images = True`` on a Qwen2-VL PatchEmbed: processor-style repeated frames give the original's
    output; a weight update invalidates the cached time-summed kernel; pixels that require grad use the full K."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

    m = PatchEmbed(patch_size=4, temporal_patch_size=2, in_channels=3, embed_dim=24)
    torch.nn.init.normal_(m.proj.weight, std=0.1)
    fused = fastvlm.nn.from_module(m)
    fused.fastvlm_still_images = True
    frame = torch.randn(13, 3, 1, 16)
    x = frame.expand(13, 3, 2, 16).reshape(13, -1)
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(x)
        ref = m.double()(x.double())
        m.float()
    assert "still x2" in t.records[0].detail, str(t)
    assert_close(out, ref, torch.float32, 96, roundings=2)
    with torch.no_grad():
        m.proj.weight.mul_(-2.0)
        assert_close(fused(x), m.double()(x.double()), torch.float32, 96, roundings=2)
        m.float()
    xg = x.clone().requires_grad_()
    with fastvlm.trace() as t, pytest.warns(fastvlm.FastVLMFallbackWarning, match="still-image mode not used"):
        fused(xg).sum().backward()
    assert "still" not in t.records[-1].detail and xg.grad is not None


def test_qwen3_unexpected_lookup_raises(monkeypatch, quiet_fallbacks):
    """A pos_embed lookup with other indices after the fused rows already hold the positions would add them twice:
    the paired module raises instead; unarmed lookups are plain."""
    model, inputs = _qwen3("torch", monkeypatch)
    fastvlm.patch(model)
    visual = model.model.visual
    pair = visual.pos_embed.__dict__["_fastvlm_pair"]
    idx, w = torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 0.25)
    x = torch.randn(4, visual.patch_embed.proj.weight[0].numel())
    with torch.no_grad():
        with pair.arm((idx, w)) as call:
            visual.patch_embed(x)
            assert call.out is not None
            with pytest.raises(RuntimeError, match="computes them differently"):
                visual.pos_embed(idx.clone())
        assert torch.equal(visual.pos_embed(idx), visual.pos_embed.weight[idx])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_patch_still_images(family, monkeypatch, quiet_fallbacks):
    """``fastvlm.patch(model, still_images=True)``: image rows built as the processor builds them (each frame
    repeated) give the unpatched logits through the halved GEMM; get_video_features keeps the full kernel."""
    model, inputs = _qwen3("torch", monkeypatch) if family == "qwen3_vl" else (None, None)
    if model is None:
        from fastvlm.tiny_models import build_tiny_model

        model, inputs = build_tiny_model(family)
    px = inputs["pixel_values"]
    T = model.model.visual.patch_embed.proj.kernel_size[0]
    n = px.shape[0]
    frame = px.view(n, 3, T, -1)[:, :, :1]
    inputs["pixel_values"] = frame.expand(n, 3, T, frame.shape[-1]).reshape(n, -1).contiguous()
    with torch.no_grad():
        ref = model(**inputs).logits
    report = fastvlm.patch(model, still_images=True)
    rows = [e for e in report.entries if e.fused == "still images"]
    assert len(rows) == 1 and rows[0].status == "patched" and rows[0].path == "model", str(report)
    with torch.no_grad(), fastvlm.trace() as t:
        out = model(**inputs).logits
    rec = [r for r in t.records if r.op == "fastvlm::rows_embed"]
    assert len(rec) == 1 and f"still x{T}" in rec[0].detail, str(t)
    assert_close(out, ref, torch.float32, px.shape[1], roundings=4)
    with torch.no_grad(), fastvlm.trace() as t:
        model.model.get_video_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert [r.detail for r in t.records if r.op == "fastvlm::rows_embed" and "still" in r.detail] == [], str(t)
    assert fastvlm.unpatch(model) == len(report.patched)
    assert "get_image_features" not in model.model.__dict__ and "get_video_features" not in model.model.__dict__


def test_qwen3_pairing_gradients(monkeypatch, quiet_fallbacks):
    """Training through the paired path: the position table's and the patch kernel's gradients equal the
    unpatched model's (the table's gradient comes from the op's backward, the zeros from pos_embed carry none)."""
    model, inputs = _qwen3("torch", monkeypatch)
    visual = model.model.visual
    params = [visual.pos_embed.weight, visual.patch_embed.proj.weight, visual.patch_embed.proj.bias]
    ref = torch.autograd.grad(model(**inputs).logits.square().sum(), params)
    fastvlm.patch(model)
    got = torch.autograd.grad(model(**inputs).logits.square().sum(), params)
    for a, b in zip(got, ref):
        assert_close(a, b, torch.float32, 1536, roundings=4, what="gradient")
