"""NaViT patch embeddings (Idefics2, Idefics3, SmolVLM): the conv GEMM with per-image bucketed position rows from
``patch_attention_mask``, against the transformers originals on ragged masks and padded pixels."""
import warnings

import pytest
import torch

import fastvlm
from fastvlm.ops.navit_positions import navit_position_ids
from helpers import assert_close, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FAMS = ["idefics2", "idefics3", "smolvlm"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
        yield


def _cls(fam):
    if fam == "idefics2":
        from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionConfig as Cfg
        from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings as C
    elif fam == "idefics3":
        from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionConfig as Cfg
        from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings as C
    else:
        from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionConfig as Cfg
        from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionEmbeddings as C
    return C, Cfg


def _module(fam, hidden=24, image_size=56, patch=7):
    from fastvlm.testing import randomize_

    C, Cfg = _cls(fam)
    cfg = Cfg(hidden_size=hidden, image_size=image_size, patch_size=patch, num_attention_heads=4, num_hidden_layers=1,
              intermediate_size=32)
    return randomize_(C(cfg))


def _ragged(B, gh, gw, seed=0):
    """Top-left-anchored valid regions of random sizes, one all-padding image, one full image."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, gh, gw, dtype=torch.bool)
    for n in range(B):
        if n == 0:
            mask[n] = True
        elif n == B - 1 and B > 2:
            continue  # a padding image: no valid patch
        else:
            h = int(torch.randint(1, gh + 1, (1,), generator=g))
            w = int(torch.randint(1, gw + 1, (1,), generator=g))
            mask[n, :h, :w] = True
    return mask


def _pixels(mask, patch, extra=(0, 0), dtype=torch.float32):
    """Pixels with exact zeros outside each image's valid region (the processor pads after normalising)."""
    B, gh, gw = mask.shape
    valid = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None].float()
    x = torch.randn(B, 3, gh * patch + extra[0], gw * patch + extra[1])
    return (x * torch.nn.functional.pad(valid, (0, extra[1], 0, extra[0]))).to(dtype)


def _original_ids(mask, side):
    """The original forward's position ids, read back through a table whose row r holds r (conv zeroed)."""
    C, Cfg = _cls("idefics2")
    m = C(Cfg(hidden_size=2, image_size=side, patch_size=1, num_attention_heads=1))
    with torch.no_grad():
        m.patch_embedding.weight.zero_()
        m.patch_embedding.bias.zero_()
        m.position_embedding.weight.copy_(torch.arange(side * side, dtype=torch.float64)[:, None].float().repeat(1, 2))
        B, gh, gw = mask.shape
        out = m(torch.zeros(B, 3, gh, gw), mask)
    return out[..., 0].round().long()


@pytest.mark.parametrize("side", [3, 7, 14, 27, 28, 32, 70])
def test_position_ids_match_the_original(side):
    """Every valid-region size up to 1.5x the grid, incl. the sides whose float arange gives an edge at exactly 1.0
    (7, 14, 27, 28) and padding images without a valid patch."""
    n = int(side * 1.5) + 1
    mask = torch.zeros(n + 1, n, n, dtype=torch.bool)
    for k in range(n + 1):  # image k: k valid rows and n - k valid columns (every count on both axes)
        mask[k, :k, :n - k] = True
    assert torch.equal(navit_position_ids(mask, side), _original_ids(mask, side))


def test_position_ids_random_ragged_masks():
    mask = _ragged(16, 23, 17, seed=3)
    assert torch.equal(navit_position_ids(mask, 70), _original_ids(mask, 70))


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_modules_vs_original(fam, backend, monkeypatch):
    """Ragged masks, one padding image, and a size that is not a multiple of the patch (the conv drops the rest)."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    m = _module(fam)
    fused = fastvlm.nn.from_module(m)
    assert isinstance(fused, type(m)) and list(fused.state_dict()) == list(m.state_dict())
    mask = _ragged(3, 4, 5, seed=1)
    x = _pixels(mask, 7, extra=(3, 5))
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(x, mask)
    assert [r.backend for r in t.records] == [backend], str(t)
    with torch.no_grad():
        ref = m.double()(x.double(), mask)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_close(out, ref, torch.float32, 147, roundings=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_dtypes(dtype, triton_backend):
    m = _module("idefics2").to(dtype)
    fused = fastvlm.nn.from_module(m)
    mask = _ragged(2, 3, 4, seed=2)
    x = _pixels(mask, 7, dtype=dtype)
    with torch.no_grad():
        out = fused(x, mask)
        ref = _module("idefics2").double()
        ref.load_state_dict(m.state_dict())
        ref = ref(x.double(), mask)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, 147, roundings=2)


def test_gradients(torch_backend):
    m = _module("idefics3").double()
    fused = fastvlm.nn.from_module(m)
    mask = _ragged(3, 4, 5, seed=4)
    x = _pixels(mask, 7, extra=(2, 0), dtype=torch.float64).requires_grad_()
    params = [x] + list(m.parameters())
    g = torch.randn(3, 20, 24, dtype=torch.float64)
    ref = torch.autograd.grad(m(x, mask), params, g)
    got = torch.autograd.grad(fused(x, mask), params, g)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-12


def test_gradients_interpreter(triton_backend):
    """The fused forward under autograd (the op's backward: per-image position rows through index_add)."""
    m = _module("smolvlm")
    fused = fastvlm.nn.from_module(m)
    mask = _ragged(2, 3, 4, seed=5)
    x = _pixels(mask, 7).requires_grad_()
    params = [x] + list(m.parameters())
    g = torch.randn(2, 12, 24)
    got = torch.autograd.grad(fused(x, mask), params, g)
    m64 = _module("smolvlm").double()
    m64.load_state_dict(m.state_dict())
    x64 = x.detach().double().requires_grad_()
    ref = torch.autograd.grad(m64(x64, mask), [x64] + list(m64.parameters()), g.double())
    for a, b in zip(got, ref):
        assert_close(a, b, torch.float32, 147 * 2, roundings=2, what="gradient")


def test_compile_fullgraph(torch_backend):
    m = _module("idefics2")
    fused = fastvlm.nn.from_module(m)
    mask = _ragged(3, 4, 5, seed=6)
    x = _pixels(mask, 7, extra=(1, 1))
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x, mask), m(x, mask).double(), torch.float32, 147, roundings=2)


def test_original_behaviour_kept(torch_backend):
    """Inputs the fused path does not take run the original: its errors, and its broadcasting of other masks."""
    m = _module("idefics2")
    fused = fastvlm.nn.from_module(m)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    for bad in (torch.randn(2, 4, 28, 28), torch.randn(2, 3, 28, 28, dtype=torch.float64)):
        with pytest.raises(RuntimeError) as want:
            m(bad, mask)
        with pytest.raises(type(want.value)):
            fused(bad, mask)
    x, bad_mask = torch.randn(2, 3, 28, 28), torch.ones(2, 5, 4, dtype=torch.bool)
    with pytest.raises((RuntimeError, IndexError)) as want:  # transformers 5.24: RuntimeError, 5.17: IndexError
        m(x, bad_mask)
    with pytest.raises(type(want.value)):
        fused(x, bad_mask)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():  # an int mask: the original's own result (or error) either way
        try:
            ref = m(x, mask.long())
        except RuntimeError as err:
            with pytest.raises(RuntimeError, match=str(err)[:30]):
                fused(x, mask.long())
        else:
            assert torch.equal(fused(x, mask.long()), ref)


def test_hooks_on_children_fall_back(torch_backend):
    m = _module("idefics2")
    fused = fastvlm.nn.from_module(m)
    seen = []
    fused.patch_embedding.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    mask = _ragged(2, 4, 4)
    with torch.no_grad():
        out = fused(_pixels(mask, 7), mask)
    assert seen == [(2, 24, 4, 4)] and out.shape == (2, 16, 24)


def test_idefics2_full_size_pytorch_path(torch_backend):
    """Idefics2-8b's embeddings (1152 wide, 980 px, 70 x 70 table): a full image and a 490 x 700 one padded to 980."""
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionConfig, Idefics2VisionEmbeddings

    m = Idefics2VisionEmbeddings(Idefics2VisionConfig(hidden_size=1152, image_size=980, patch_size=14))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    mask = torch.zeros(2, 70, 70, dtype=torch.bool)
    mask[0] = True
    mask[1, :35, :50] = True
    x = _pixels(mask, 14)
    with torch.no_grad():
        out = fastvlm.nn.from_module(m)(x, mask)
        ref = m(x, mask)
    assert out.shape == ref.shape == (2, 4900, 1152) and rel_err(out, ref) < 1e-5


def test_patched_in_a_tiny_idefics2(torch_backend):
    from fastvlm.tiny_models import build_tiny_model

    model, inputs = build_tiny_model("idefics2")
    with torch.no_grad():
        ref = model(**inputs).logits
    report = fastvlm.patch(model, verify=True)
    emb = [e for e in report.patched if e.path.endswith("embeddings")]
    assert len(emb) == 1 and "ok" in emb[0].detail, str(report)
    with torch.no_grad(), fastvlm.trace() as t:
        out = model(**inputs).logits
    assert "fastvlm::patch_embed" in {r.op for r in t.records}
    assert rel_err(out, ref) < 1e-5
    fastvlm.unpatch(model)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uint8_padded_batch(backend, monkeypatch):
    """Raw uint8 images of different sizes padded into one batch, fed with ``image_hw``: the GEMM normalises each
    pixel as it loads it and takes the pixels outside each image as 0 afterwards, which is what Idefics2's processor
    produces (normalise, then pad with zeros). Sizes that cut patches in half (boundary patches are partly padding)."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    from fastvlm.ops.patch_embed import patch_embed

    m = _module("idefics2")
    p, side = 7, m.num_patches_per_side
    hw = torch.tensor([[56, 56], [31, 45], [8, 20]])  # pixels; 31 and 45 and 20 are not multiples of the patch
    img = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8)
    for b, (h, w) in enumerate(hw.tolist()):
        img[b, :, h:] = 0  # whatever the padding holds in uint8 must not matter
        img[b, :, :, w:] = 255
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    norm = (img.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    pix_mask = torch.zeros(3, 56, 56, dtype=torch.bool)
    for b, (h, w) in enumerate(hw.tolist()):
        pix_mask[b, :h, :w] = True
    norm = norm * pix_mask[:, None]  # the processor's zero padding after normalising
    patch_mask = pix_mask.unfold(1, p, p).unfold(2, p, p).sum((-1, -2)) > 0  # as Idefics2VisionTransformer does
    ids = navit_position_ids(patch_mask, side).reshape(-1)
    conv = m.patch_embedding
    with torch.no_grad(), fastvlm.trace() as t:
        out = patch_embed(img, conv.weight, conv.bias, pos=m.position_embedding.weight, pos_rows=ids,
                          pixel_scale=1 / (255 * std), pixel_shift=-mean / std, image_hw=hw)
    assert [r.backend for r in t.records] == [backend] and "padded" in t.records[0].detail, str(t)
    with torch.no_grad():
        ref = m.double()(norm.double(), patch_mask)
    assert_close(out, ref, torch.float32, 147, roundings=2)
    with pytest.raises(ValueError, match="image_hw applies to uint8 pixels"):
        patch_embed(norm, conv.weight.float(), image_hw=hw)
    with pytest.raises(ValueError, match="image_hw must be an integer"):
        patch_embed(img, conv.weight.float(), pixel_scale=1 / (255 * std), pixel_shift=-mean / std,
                    image_hw=hw.float())
