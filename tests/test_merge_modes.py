"""Space-to-depth and pooled A loads (pixel shuffle, F.unfold order, average pooling), their norms and gradients.

Small ragged cases under the interpreter: non-square grids, several images, ragged image sizes, scales 2 and 3,
every dtype, float64 references, poisoned output margins.
"""
import pytest
import torch
import torch.nn.functional as F

from fastvlm.kernels.gemm import fused_linear
from fastvlm.kernels.norm_stats import row_stats
from fastvlm.ops.layout import gather_ref, pool_rows, ragged_space_to_depth_rows, space_to_depth_rows
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.projector import mlp_projector_ref, norm_ref
from helpers import Guarded, assert_close, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_layout_matches_transformers_pixel_shuffle():
    """The row table reproduces Idefics3's and InternVL's pixel_shuffle and Mistral 3's unfold exactly."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    B, H, D, s = 2, 6, 5, 3
    x = torch.randn(B, H * H, D)
    shuffled = Idefics3Connector.pixel_shuffle(None, x, scale_factor=s)
    rows = space_to_depth_rows(B, H, H, s)
    assert torch.equal(gather_ref(x.reshape(-1, D), rows, "concat"), shuffled.reshape(-1, s * s * D))
    # F.unfold (channel-major), Mistral 3's merge of one image of a 4 x 6 grid
    h, w = 4, 6
    img = torch.randn(h * w, D)
    unfolded = F.unfold(img.view(h, w, D).permute(2, 0, 1)[None], kernel_size=2, stride=2).view(D * 4, -1).t()
    assert torch.equal(gather_ref(img, space_to_depth_rows(1, h, w, 2), "concat_cm"), unfolded)
    # average pooling (Gemma 3 style)
    pooled = F.avg_pool2d(img.view(h, w, D).permute(2, 0, 1)[None], 2).flatten(2)[0].t()
    assert torch.allclose(gather_ref(img, pool_rows(1, h, w, 2), "mean"), pooled, atol=1e-6)
    # max pooling (LLaVA-NeXT-Video's pooler in max mode)
    maxed = F.max_pool2d(img.view(h, w, D).permute(2, 0, 1)[None], 2).flatten(2)[0].t()
    assert torch.equal(gather_ref(img, pool_rows(1, h, w, 2), "max"), maxed)


def test_max_adjoint_matches_max_pool2d_with_ties():
    """The gradient of a max window goes to its first maximal element, as max_pool2d's backward sends it."""
    from fastvlm.ops.layout import scatter_back

    h, w, D = 4, 6, 3
    img = torch.randint(0, 3, (h * w, D)).double()  # many ties
    nchw = img.view(h, w, D).permute(2, 0, 1)[None].clone().requires_grad_()
    g = torch.randn(1, D, h // 2, w // 2, dtype=torch.float64)
    F.max_pool2d(nchw, 2).backward(g)
    ref = nchw.grad[0].permute(1, 2, 0).reshape(h * w, D)
    ours = scatter_back(g[0].flatten(1).t(), pool_rows(1, h, w, 2), "max", h * w, img)
    assert torch.equal(ours, ref)


def test_layout_errors():
    with pytest.raises(ValueError, match="cannot be merged in 2x2"):
        space_to_depth_rows(1, 5, 4, 2)


def _setup(mode, dtype, B=2, H=4, W=6, D=24, N=40, s=2):
    x = (torch.randn(B * H * W, D) * 2 + 0.5).to(dtype)
    rows = pool_rows(B, H, W, s) if mode in ("mean", "max") else space_to_depth_rows(B, H, W, s)
    K = D if mode in ("mean", "max") else s * s * D
    w = (torch.randn(N, K) * K ** -0.5).to(dtype)
    b = torch.randn(N).to(dtype)
    return x, rows, w, b, K


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["concat", "concat_cm", "mean", "max"])
def test_gather_gemm(dtype, mode):
    x, rows, w, b, K = _setup(mode, dtype)
    out = Guarded((rows.shape[0], w.shape[0]), dtype, "cpu")
    fused_linear(x, w, b, act="gelu", a_rows=rows, a_mode=mode, out=out.tensor, config=(16, 32, 32, 4, 1))
    a = gather_ref(x, rows, mode).double() if mode != "mean" else gather_ref(x.double(), rows, mode)
    assert_close(out.tensor, F.gelu(a @ w.double().T + b.double()), dtype, K, roundings=2)
    out.check("out")


@pytest.mark.parametrize("aligned", [True, False])
def test_gather_gemm_aligned_tiles(aligned):
    """D a multiple of BLOCK_K takes the one-row-per-tile path; otherwise tiles straddle source rows."""
    D = 32 if aligned else 20
    x, rows, w, b, K = _setup("concat", torch.float32, D=D)
    out = fused_linear(x, w, b, a_rows=rows, a_mode="concat", config=(16, 32, 32, 4, 1))
    assert_close(out, gather_ref(x, rows, "concat").double() @ w.double().T + b.double(), torch.float32, K)


@pytest.mark.parametrize("mode", ["concat", "mean"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "rmsnorm_1p"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_after_merge(mode, norm, dtype):
    """InternVL/Aya (LayerNorm over the merged row), Gemma 3 (RMSNorm(1+w) over the pooled row)."""
    if mode == "concat" and norm == "rmsnorm_1p":
        pytest.skip("no connector combines these")
    x, rows, w, b, K = _setup(mode, dtype)
    rms = norm != "layernorm"
    mean, rstd = row_stats(x, 1e-6, rms, rows=rows, mode=mode)
    a = gather_ref(x, rows, mode)
    ref_stats = (a.double() - (0 if rms else a.double().mean(-1, keepdim=True))).pow(2).mean(-1).add(1e-6).rsqrt()
    # a pooled row is rounded to the input dtype before its statistics (as AvgPool's output is)
    assert_close(rstd, ref_stats, dtype, K, what="rstd")
    nw = torch.randn(K).to(dtype) * 0.5
    nb = torch.randn(K).to(dtype) if norm == "layernorm" else None
    out = fused_linear(x, w, b, norm=norm, norm_group=K, mean=mean, rstd=rstd, norm_weight=nw, norm_bias=nb,
                       a_rows=rows, a_mode=mode, config=(16, 32, 32, 4, 1))
    an = norm_ref(a.double(), norm, nw.double(), None if nb is None else nb.double(), K, 1e-6)
    assert_close(out, an @ w.double().T + b.double(), dtype, K, roundings=3)


@pytest.mark.parametrize("mode", ["concat", "concat_cm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_before_merge(mode, dtype):
    """Mistral 3: RMSNorm on each token, then the unfold merge (stats and weights indexed by source row/channel)."""
    x, rows, w, b, K = _setup(mode, dtype, D=20)
    D = x.shape[1]
    _, rstd = row_stats(x, 1e-5, True)
    nw = torch.randn(D).to(dtype)
    out = fused_linear(x, w, None, norm="rmsnorm", norm_group=D, rstd=rstd, norm_weight=nw, norm_src=True,
                       a_rows=rows, a_mode=mode, config=(16, 32, 32, 4, 1))
    xn = norm_ref(x.double(), "rmsnorm", nw.double(), None, D, 1e-5)
    assert_close(out, gather_ref(xn, rows, mode) @ w.double().T, dtype, K, roundings=3)


def test_ragged_images():
    """Two images of different grids in one sequence (Mistral 3 / Pixtral packing)."""
    sizes = [(4, 6), (2, 2)]
    D = 16
    x = torch.randn(sum(h * w for h, w in sizes), D)
    rows = ragged_space_to_depth_rows(sizes, 2)
    assert rows.shape == (6 + 1, 4) and int(rows.max()) == x.shape[0] - 1
    w = torch.randn(24, 4 * D) / 8
    out = fused_linear(x, w, a_rows=rows, a_mode="concat_cm", config=(16, 32, 32, 4, 1))
    assert_close(out, gather_ref(x, rows, "concat_cm").double() @ w.double().T, torch.float32, 4 * D)


CASES = {  # name: (a_mode, norm, norm_src, act, act2, two linears[, gated])
    "idefics3": ("concat", "none", False, "none", "none", False),
    "aya_swiglu": ("concat", "layernorm", False, "silu", "none", True, True),
    "internvl": ("concat", "layernorm", False, "gelu", "none", True),
    "llama4_adapter": ("concat", "none", False, "gelu", "gelu", True),
    "mistral3": ("concat_cm", "rmsnorm", True, "none", "none", False),
    "gemma3": ("mean", "rmsnorm_1p", False, "none", "none", False),
    "maxpool_mlp": ("max", "none", False, "gelu", "none", True),  # LLaVA-NeXT-Video's max pooler + projector
}


def _op_case(name, dtype, grad=True):
    mode, norm, norm_src, act, act2, two, *gated = CASES[name]
    gated = bool(gated and gated[0])
    x, rows, w1, b1, K = _setup(mode, dtype, D=12, N=40 if gated else 20)
    D = x.shape[1]
    kw = dict(rows=rows, a_mode=mode, act=act, act2=act2, norm=norm, norm_src=norm_src, eps=1e-6)
    if gated:
        kw["gated"] = True
    w2 = b2 = None
    if two:
        w2, b2 = (torch.randn(16, 20) / 5).to(dtype), torch.randn(16).to(dtype)
    if norm != "none":
        g = D if norm_src else K
        kw["norm_group"] = g
        kw["norm_weight"] = torch.randn(g).to(dtype) * 0.5
        if norm == "layernorm":
            kw["norm_bias"] = torch.randn(g).to(dtype)
    tensors = [x, w1, b1, w2, b2, kw.get("norm_weight"), kw.get("norm_bias")]
    for t in tensors:
        if t is not None:
            t.requires_grad_(grad)
    return tensors, kw


def _grads(fn, tensors, kw, gy=None):
    x, w1, b1, w2, b2, nw, nb = tensors
    kw = {k: v for k, v in kw.items() if k not in ("norm_weight", "norm_bias")}
    y = fn(x, w1, b1, w2, b2, norm_weight=nw, norm_bias=nb, **kw)
    if gy is None:
        gy = torch.randn_like(y)
    inputs = [t for t in tensors if t is not None]
    return y, gy, torch.autograd.grad(y, inputs, gy)


@pytest.mark.parametrize("name", list(CASES))
def test_op_backward_pytorch_path(name, torch_backend):
    tensors, kw = _op_case(name, torch.float64)
    y, gy, g_ours = _grads(mlp_projector, tensors, kw)
    y_ref, _, g_ref = _grads(mlp_projector_ref, tensors, kw, gy)
    assert rel_err(y, y_ref) < 1e-12
    for a, b in zip(g_ours, g_ref):
        assert rel_err(a, b) < (1e-6 if "rmsnorm" in kw["norm"] else 1e-12)  # transformers' RMSNorms use fp32


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_triton_path(name, dtype, triton_backend):
    tensors, kw = _op_case(name, dtype)
    y, gy, g_ours = _grads(mlp_projector, tensors, kw)
    t64 = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    y64, _, g_ref = _grads(mlp_projector_ref, t64, kw, gy.double())
    K = tensors[1].shape[1]
    assert_close(y, y64, dtype, K, roundings=4)
    for a, b in zip(g_ours, g_ref):
        assert_close(a, b, dtype, max(K, y.shape[0]), roundings=5, what="gradient")


@pytest.mark.parametrize("name", ["internvl", "gemma3", "mistral3", "aya_swiglu", "maxpool_mlp"])
def test_op_opcheck(name):
    import warnings

    import fastvlm

    tensors, kw = _op_case(name, torch.float32)
    x, w1, b1, w2, b2, nw, nb = tensors
    args = (x, w1, b1, w2, b2, nw, nb, kw["rows"], None, None, kw["norm"], kw.get("norm_group", 1), kw["eps"], kw["act"],
            kw["act2"], kw["a_mode"], kw["norm_src"], kw.get("gated", False), True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
        torch.library.opcheck(torch.ops.fastvlm.mlp_projector.default, args)
