"""The CUDA C++ extension (csrc/): every .cuh compiled by nvcc; the extension built once and imported; its CPU and
Meta implementations against the PyTorch reference (preprocessing) and masked_scatter (image-token scatter) and
torch.library.opcheck; CUDA parity on a GPU (marked gpu).

The build is shared by the whole session (fastvlm._cext caches the module; the build itself is cached on disk).
Without nvcc/ninja/a compiler the extension tests skip with the reason; a build that is attempted and fails is a
test failure (a compile error in csrc/ must not pass CI silently).
"""
import glob
import os
import re
import subprocess
import warnings

import pytest
import torch

import fastvlm
from fastvlm import _cext, _dispatch
from fastvlm.ops import preprocess as pp
from helpers import require_extension

CSRC = _cext.CSRC
HEADERS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CSRC, "*.cuh")))
TORCH_FREE = HEADERS + ["launch.h", "launch.cu", "preprocess_cpu.h", "scatter_cpu.h"]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _nvcc():
    home = _cext.find_cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def _nvcc_or_skip():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit): the kernels cannot be syntax-checked here")
    return nvcc


def ext_or_skip():
    return require_extension()


@pytest.fixture(scope="module")
def ext():
    return ext_or_skip()


# ---------------------------------------------------------------- source checks (no build)


def test_headers_exist():
    assert {"common.cuh", "preprocess.cuh", "scatter.cuh"} <= set(HEADERS)


@pytest.mark.parametrize("name", TORCH_FREE)
def test_kernel_sources_are_torch_free(name):
    with open(os.path.join(CSRC, name)) as f:
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', f.read())
    bad = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11", "Python.h")]
    assert not bad, f"{name} must stay torch-free (fast nvcc checks, small TUs), includes {bad}"


@pytest.mark.parametrize("header", HEADERS)
def test_cuh_compiles(header, tmp_path):
    """Each header on its own (self-contained), nvcc --ptx for sm_90: about 1 s."""
    nvcc = _nvcc_or_skip()
    tu = tmp_path / "tu.cu"
    tu.write_text(f'#include "{header}"\n')
    proc = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "--ptx", "-I", CSRC, str(tu), "-o",
                           str(tmp_path / "tu.ptx")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed on {header}:\n{proc.stderr}"


def test_kernels_instantiate(tmp_path):
    """launch.cu instantiates every kernel for every output dtype: the templates' bodies are compiled too."""
    nvcc = _nvcc_or_skip()
    ptx = tmp_path / "launch.ptx"
    proc = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "--ptx", "-I", CSRC, os.path.join(CSRC, "launch.cu"),
                           "-o", str(ptx)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    entries = re.findall(r"\.entry\s+(\w+)", ptx.read_text())
    count = lambda name: sum(name in e for e in entries)  # noqa: E731
    assert count("normalize_tiles") == 3 and count("patchify") == 3, entries
    # scatter: the scan, and the row copy for 7 (embeddings, features) dtype pairs x {16-byte, 1-element} accesses
    assert count("scatter_scan_kernel") == 1 and count("scatter_rows_kernel") == 14, entries
    assert len(entries) == 21, entries


def test_scatter_kernels_use_16_byte_accesses(tmp_path):
    """The aligned row copy moves 16-byte packs (loads and stores): a struct of bf16 stored element by element would
    halve the bandwidth and still pass every value test."""
    nvcc = _nvcc_or_skip()
    ptx = tmp_path / "launch.ptx"
    proc = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "--ptx", "-I", CSRC, os.path.join(CSRC, "launch.cu"),
                           "-o", str(ptx)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    bodies = re.split(r"(?=\.visible \.entry )", ptx.read_text())
    for body in bodies:
        name = re.match(r"\.visible \.entry (\w+)", body)
        if not name or "scatter_rows_kernel" not in name.group(1) or "Li1EE" in name.group(1):
            continue
        stores = set(re.findall(r"st\.global[.\w]*", body))
        assert stores == {"st.global.v4.u32"}, (name.group(1), stores)
        assert re.search(r"ld\.global[.\w]*\.v[24]", body), name.group(1)


def test_abi_version_matches_source():
    with open(os.path.join(CSRC, "ops.cpp")) as f:
        m = re.search(r"#define FASTVLM_EXT_ABI_VERSION (\d+)", f.read())
    assert m and int(m.group(1)) == _cext.ABI_VERSION


# ---------------------------------------------------------------- loading, status, reasons (no build)


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("FASTVLM_CEXT", "0")
    assert _cext.load() is None
    ok, why = _cext.available()
    assert not ok and "FASTVLM_CEXT=0" in why
    assert _cext.status().startswith("disabled")


def test_missing_requirements_give_reasons(monkeypatch):
    """No toolkit, no ninja: load() returns None and the reason names both; nothing is built, nothing raises."""
    monkeypatch.delenv("FASTVLM_CEXT", raising=False)
    monkeypatch.setattr(_cext, "_module", None)
    monkeypatch.setattr(_cext, "_failure", None)
    monkeypatch.setattr(_cext, "_namespace_registered", lambda: False)
    monkeypatch.setattr(_cext, "find_cuda_home", lambda: None)
    real_which = _cext.shutil.which
    monkeypatch.setattr(_cext.shutil, "which", lambda name: None if name == "ninja" else real_which(name))
    monkeypatch.setattr(_cext, "_build", lambda folder: pytest.fail("must not build"))
    assert _cext.load(build=True) is None
    ok, why = _cext.available()
    assert not ok and "no CUDA toolkit" in why and "ninja" in why
    assert _cext.failure_kind() == "unavailable"
    assert _cext.status().startswith("unavailable: ")


def test_status_never_builds(monkeypatch):
    monkeypatch.setattr(_cext, "_build", lambda folder: pytest.fail("status() must not build"))
    line = _cext.status()
    assert isinstance(line, str) and line


def test_build_settings_without_gpu(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    s = _cext.build_settings()
    assert CSRC in s["include_dirs"]
    if not torch.cuda.is_available():
        assert s["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    if _nvcc():
        home = s["env"]["CUDA_HOME"]
        assert os.path.isfile(os.path.join(home, "bin", "nvcc")) and _cext._has_cudart(home)


def test_fallback_reported_when_extension_unavailable(monkeypatch):
    """On CUDA tensors without the extension, the op takes the PyTorch path and says why (no GPU needed)."""
    monkeypatch.setattr(_cext, "available", lambda build=True: (False, "no CUDA toolkit found"))
    _dispatch.reset_warnings()
    with pytest.warns(fastvlm.FastVLMFallbackWarning, match="CUDA extension unavailable: no CUDA toolkit"):
        with fastvlm.trace() as t:
            assert pp._choose(pp.OP_TILES, torch.device("cuda"), None, [], "d") == "torch"
    assert t.backends() == ["torch"]
    monkeypatch.setenv("FASTVLM_STRICT", "1")
    with pytest.raises(fastvlm.FastVLMFallbackError, match="no CUDA toolkit"):
        pp._choose(pp.OP_TILES, torch.device("cuda"), None, [], "d")


def test_cpu_tensors_report_fallback(monkeypatch):
    img = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    _dispatch.reset_warnings()
    with pytest.warns(fastvlm.FastVLMFallbackWarning, match="tensors are on cpu"):
        pp.normalize_images(img, CLIP_MEAN, CLIP_STD)
    monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fastvlm.trace() as t:
            pp.normalize_images(img, CLIP_MEAN, CLIP_STD)
    assert t.backends() == ["torch"]
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    with pytest.raises(fastvlm.FastVLMFallbackError, match="fastvlm_ext"):
        pp.normalize_images(img, CLIP_MEAN, CLIP_STD)


# ---------------------------------------------------------------- the built extension: CPU and Meta vs reference


def _images(sizes, c=3, frames=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = frames or [1] * len(sizes)
    return [torch.randint(0, 256, ((f,) if f > 1 else ()) + (h, w, c), dtype=torch.uint8, generator=g)
            for (h, w), f in zip(sizes, frames)]


def test_module_imports_and_registers(ext):
    assert ext.ABI_VERSION == _cext.ABI_VERSION and ext.NAMESPACE == "fastvlm_ext"
    assert "scatter_image_features" in _cext.OPS
    for op in _cext.OPS:
        assert hasattr(torch.ops.fastvlm_ext, op)
    assert _cext.status().startswith("loaded: ") and "scatter_image_features" in _cext.status()
    with fastvlm.trace() as t:
        pp.normalize_images(_images([(4, 4)]), CLIP_MEAN, CLIP_STD, backend="ext")
    assert t.backends() == ["fastvlm_ext"]


NORM_MODES = [dict(), dict(do_rescale=False), dict(do_normalize=False), dict(do_rescale=False, do_normalize=False),
              dict(rescale_factor=1 / 127.5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [1, 3, 4])
@pytest.mark.parametrize("mode", range(len(NORM_MODES)))
def test_tiles_cpu_matches_reference(ext, dtype, c, mode):
    imgs = _images([(9, 13), (16, 7), (16, 16), (1, 1)], c=c)
    mean, std = [0.1, 0.5, 0.9, 0.3][:c], [0.2, 0.25, 0.7, 0.4][:c]
    kw = dict(NORM_MODES[mode], dtype=dtype, out_size=(17, 18), pad_value=-1.5)
    out = pp.normalize_images(imgs, mean, std, backend="ext", **kw)
    ref = pp.normalize_images(imgs, mean, std, backend="torch", **kw)
    assert out.shape == (4, c, 17, 18) and out.dtype == dtype
    assert torch.equal(out, ref)


def test_tiles_flat_buffer_with_offsets(ext):
    """Images anywhere in one buffer (gaps between them): offsets are honoured."""
    imgs = _images([(5, 6), (6, 5), (4, 4)])
    buf = torch.full((1000,), 7, dtype=torch.uint8)
    offsets = [13, 300, 777]
    for im, off in zip(imgs, offsets):
        buf[off:off + im.numel()] = im.reshape(-1)
    sizes = [im.shape[:2] for im in imgs]
    out = pp.normalize_images(buf, CLIP_MEAN, CLIP_STD, sizes=sizes, offsets=offsets, channels=3, backend="ext")
    ref = pp.normalize_images(imgs, CLIP_MEAN, CLIP_STD, backend="torch")
    assert torch.equal(out, ref)


GEOMS = [(14, 2, 2), (16, 2, 2), (14, 1, 1), (4, 3, 3)]


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: "p{}m{}t{}".format(*g))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patchify_cpu_matches_reference(ext, geom, dtype):
    p, m, t = geom
    f = p * m
    sizes = [(f, 2 * f), (3 * f, f), (2 * f, 2 * f)]
    imgs = _images(sizes, frames=[1, 3, 4])  # a still image, a video padded to a multiple of t, a video
    kw = dict(patch_size=p, merge_size=m, temporal_patch_size=t, dtype=dtype)
    out, thw = pp.qwen2vl_patchify(imgs, CLIP_MEAN, CLIP_STD, backend="ext", **kw)
    ref, thw_ref = pp.qwen2vl_patchify(imgs, CLIP_MEAN, CLIP_STD, backend="torch", **kw)
    assert torch.equal(thw, thw_ref)
    assert out.shape == (int(thw.prod(-1).sum()), 3 * t * p * p) and out.dtype == dtype
    assert torch.equal(out, ref)


def test_patchify_still_image_is_duplicated(ext):
    """A still image's row holds the same T frames: columns [c, t, :, :] equal for every t."""
    (img,) = _images([(28, 28)])
    out, _ = pp.qwen2vl_patchify([img], CLIP_MEAN, CLIP_STD, backend="ext")
    rows = out.view(-1, 3, 2, 14 * 14)
    assert torch.equal(rows[:, :, 0], rows[:, :, 1])


def _ops_args():
    imgs = _images([(8, 12), (12, 8)])
    p = pp.pack_images(imgs)
    sub, div = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    tiles_meta = torch.tensor([[o, h, w] for o, (h, w) in zip(p.offsets, p.sizes)])
    patch_meta = torch.tensor([[p.offsets[0], 8, 12, 1, 0], [p.offsets[1], 12, 8, 1, 6]])
    tiles = (p.data, tiles_meta, sub, div, 1.0, 12, 13, 0.5, torch.float32)
    patchify = (p.data, patch_meta, sub, div, 1.0, 4, 1, 2, 12, torch.bfloat16)
    return tiles, patchify


def test_meta_implementations(ext):
    tiles, patchify = _ops_args()
    to_meta = lambda args: tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)  # noqa: E731
    out = torch.ops.fastvlm_ext.normalize_tiles(*to_meta(tiles))
    assert out.device.type == "meta" and out.shape == (2, 3, 12, 13) and out.dtype == torch.float32
    out = torch.ops.fastvlm_ext.qwen2vl_patchify(*to_meta(patchify))
    assert out.device.type == "meta" and out.shape == (12, 3 * 2 * 16) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("which", ["tiles", "patchify"])
def test_opcheck_cpu(ext, which):
    tiles, patchify = _ops_args()
    op = torch.ops.fastvlm_ext.normalize_tiles if which == "tiles" else torch.ops.fastvlm_ext.qwen2vl_patchify
    torch.library.opcheck(op, tiles if which == "tiles" else patchify)


def test_cpu_implementation_validates(ext):
    tiles, patchify = _ops_args()
    data, meta = tiles[0], tiles[1]
    bad = meta.clone()
    bad[1, 0] = data.numel() - 10
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.fastvlm_ext.normalize_tiles(data, bad, *tiles[2:])
    with pytest.raises(RuntimeError, match="larger than"):
        torch.ops.fastvlm_ext.normalize_tiles(data, meta, *tiles[2:5], 8, 8, *tiles[7:])
    with pytest.raises(RuntimeError, match="total_rows"):
        torch.ops.fastvlm_ext.qwen2vl_patchify(*patchify[:8], 13, patchify[9])
    with pytest.raises(RuntimeError, match="multiples of patch_size"):
        torch.ops.fastvlm_ext.qwen2vl_patchify(*patchify[:5], 5, *patchify[6:])
    with pytest.raises(RuntimeError, match="channels"):
        torch.ops.fastvlm_ext.normalize_tiles(data, meta, [0.0] * 5, [1.0] * 5, *tiles[4:])
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.fastvlm_ext.normalize_tiles(data.float(), meta, *tiles[2:])


# ---------------------------------------------------------------- CUDA parity (GPU runs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_tiles_match_cpu(ext, dtype):
    imgs = _images([(224, 224), (200, 150), (37, 223)], seed=1)
    kw = dict(dtype=dtype, out_size=(224, 224), pad_value=0.25)
    cpu = pp.normalize_images(imgs, CLIP_MEAN, CLIP_STD, backend="ext", **kw)
    with fastvlm.trace() as t:
        gpu = pp.normalize_images(imgs, CLIP_MEAN, CLIP_STD, device="cuda", **kw)
    assert t.backends() == ["fastvlm_ext"]
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: "p{}m{}t{}".format(*g))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_patchify_matches_cpu(ext, geom, dtype):
    p, m, t = geom
    f = p * m
    imgs = _images([(8 * f, 6 * f), (f, f), (2 * f, 3 * f)], frames=[1, 1, 5], seed=2)
    kw = dict(patch_size=p, merge_size=m, temporal_patch_size=t, dtype=dtype)
    cpu, thw = pp.qwen2vl_patchify(imgs, CLIP_MEAN, CLIP_STD, backend="ext", **kw)
    gpu, thw_gpu = pp.qwen2vl_patchify([i.cuda() for i in imgs], CLIP_MEAN, CLIP_STD, **kw)
    assert gpu.is_cuda and torch.equal(thw_gpu.cpu(), thw)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["tiles", "patchify"])
def test_opcheck_cuda(ext, which):
    tiles, patchify = _ops_args()
    args = tiles if which == "tiles" else patchify
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    op = torch.ops.fastvlm_ext.normalize_tiles if which == "tiles" else torch.ops.fastvlm_ext.qwen2vl_patchify
    torch.library.opcheck(op, args)


@pytest.mark.gpu
def test_cuda_bad_metadata_gives_nan_not_a_fault(ext):
    tiles, patchify = _ops_args()
    data, meta = tiles[0].cuda(), tiles[1].cuda()
    bad = meta.clone()
    bad[1, 0] = data.numel() - 10  # image 1 runs past the buffer
    out = torch.ops.fastvlm_ext.normalize_tiles(data, bad, *tiles[2:])
    torch.cuda.synchronize()
    assert not out[0].isnan().any() and out[1].isnan().all()
    out = torch.ops.fastvlm_ext.qwen2vl_patchify(data, patchify[1].cuda(), *patchify[2:8], 14, patchify[9])
    torch.cuda.synchronize()
    assert not out[:12].isnan().any() and out[12:].isnan().all()  # rows past the last image


# ---------------------------------------------------------------- scatter_image_features (CPU, Meta, opcheck)

SCATTER_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                  (torch.float16, torch.float32), (torch.float16, torch.float16), (torch.float64, torch.float64),
                  (torch.float64, torch.float32), (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)]


def _scatter_case(rows=77, dim=40, dtype=torch.float32, feat_dtype=None, p=0.4, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(rows, dim, generator=g).to(dtype)
    mask = torch.rand(rows, generator=g) < p
    feats = torch.randn(int(mask.sum()), dim, generator=g).to(feat_dtype or dtype)
    return embeds.to(device), mask.to(device), feats.to(device)


def _masked_scatter(embeds, mask, feats):
    return embeds.masked_scatter(mask[:, None].expand_as(embeds), feats.to(embeds.dtype))


@pytest.mark.parametrize("dtype,feat_dtype", SCATTER_DTYPES, ids=lambda t: str(t).replace("torch.", ""))
def test_scatter_cpu_matches_masked_scatter(ext, dtype, feat_dtype):
    embeds, mask, feats = _scatter_case(dtype=dtype, feat_dtype=feat_dtype)
    out, n = torch.ops.fastvlm_ext.scatter_image_features(embeds, mask, feats)
    assert out.dtype == dtype and out.shape == embeds.shape and out.is_contiguous()
    assert n.dtype == torch.int64 and n.shape == () and int(n) == feats.shape[0]
    assert torch.equal(out, _masked_scatter(embeds, mask, feats))


@pytest.mark.parametrize("rows,p", [(0, 0.5), (1, 1.0), (31, 0.5), (32, 1.0), (33, 0.0), (1000, 0.3), (4097, 0.9)])
def test_scatter_cpu_row_counts(ext, rows, p):
    """Group boundaries (32 rows), empty input, no image token, only image tokens."""
    embeds, mask, feats = _scatter_case(rows=rows, dim=24, p=p, seed=rows)
    out, n = torch.ops.fastvlm_ext.scatter_image_features(embeds, mask, feats)
    assert int(n) == int(mask.sum())
    assert torch.equal(out, _masked_scatter(embeds, mask, feats))


def test_scatter_cpu_strided_inputs(ext):
    """Row strides (views into wider buffers), a uint8 mask, a non-contiguous features tensor, width 1."""
    embeds, mask, feats = _scatter_case(rows=70, dim=33, dtype=torch.bfloat16, feat_dtype=torch.float32)
    wide_e = torch.randn(70, 50).to(torch.bfloat16)
    wide_e[:, 7:40] = embeds
    feats_t = feats.t().contiguous().t()  # column-major: stride(1) != 1
    out, _ = torch.ops.fastvlm_ext.scatter_image_features(wide_e[:, 7:40], mask.to(torch.uint8), feats_t)
    assert torch.equal(out, _masked_scatter(embeds, mask, feats))
    e1, m1, f1 = _scatter_case(rows=40, dim=1)
    out, _ = torch.ops.fastvlm_ext.scatter_image_features(e1, m1, f1)
    assert torch.equal(out, _masked_scatter(e1, m1, f1))


@pytest.mark.parametrize("delta", [-1, 1])
def test_scatter_count_mismatch_is_reported_not_raised(ext, delta):
    """The op itself never raises on a count mismatch (the CUDA one cannot without a sync): it returns the count it
    found and writes the image-token rows as NaN; fastvlm.scatter_image_features turns that into the ValueError."""
    import fastvlm

    embeds, mask, feats = _scatter_case()
    feats = torch.cat([feats, feats[:1]]) if delta > 0 else feats[:-1]
    out, n = torch.ops.fastvlm_ext.scatter_image_features(embeds, mask, feats)
    assert int(n) == int(mask.sum())
    assert out[mask].isnan().all() and torch.equal(out[~mask], embeds[~mask])
    want = f"Image features and image tokens do not match, tokens: {int(mask.sum())}, features: {feats.shape[0]}"
    with pytest.raises(ValueError, match=want):
        fastvlm.scatter_image_features(embeds[None], mask[None], feats, backend="cuda")


def test_scatter_meta(ext):
    embeds, mask, feats = _scatter_case(dtype=torch.bfloat16, feat_dtype=torch.float32)
    out, n = torch.ops.fastvlm_ext.scatter_image_features(embeds.to("meta"), mask.to("meta"), feats.to("meta"))
    assert out.device.type == "meta" and out.shape == embeds.shape and out.dtype == torch.bfloat16
    assert n.device.type == "meta" and n.shape == () and n.dtype == torch.int64


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype,feat_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["f32", "bf16-f32"])
def test_scatter_opcheck_cpu(ext, grad, dtype, feat_dtype):
    embeds, mask, feats = _scatter_case(dtype=dtype, feat_dtype=feat_dtype)
    torch.library.opcheck(torch.ops.fastvlm_ext.scatter_image_features.default,
                          (embeds.requires_grad_(grad), mask, feats.requires_grad_(grad)))


def test_scatter_autograd_cpu(ext):
    embeds, mask, feats = _scatter_case(dtype=torch.float64)
    e1, f1 = embeds.clone().requires_grad_(), feats.clone().requires_grad_()
    e2, f2 = embeds.clone().requires_grad_(), feats.clone().requires_grad_()
    g = torch.randn_like(embeds)
    torch.ops.fastvlm_ext.scatter_image_features(e1, mask, f1)[0].backward(g)
    _masked_scatter(e2, mask, f2).backward(g)
    assert torch.equal(e1.grad, e2.grad) and torch.equal(f1.grad, f2.grad)
    e3, m3, f3 = _scatter_case(rows=20, dim=3, dtype=torch.float64, seed=3)
    torch.autograd.gradcheck(lambda e, f: torch.ops.fastvlm_ext.scatter_image_features(e, m3, f)[0],
                             (e3.requires_grad_(), f3.requires_grad_()))


def test_scatter_validates(ext):
    embeds, mask, feats = _scatter_case()
    op = torch.ops.fastvlm_ext.scatter_image_features
    with pytest.raises(RuntimeError, match="image_mask has 76 rows"):
        op(embeds, mask[:-1], feats)
    with pytest.raises(RuntimeError, match="width 39"):
        op(embeds, mask, feats[:, :-1])
    with pytest.raises(RuntimeError, match="bool"):
        op(embeds, mask.float(), feats)
    with pytest.raises(RuntimeError, match="2-D float"):
        op(embeds[None], mask, feats)
    with pytest.raises(RuntimeError, match="2-D float"):
        op(embeds.to(torch.int32), mask, feats)


# ---------------------------------------------------------------- scatter_image_features on CUDA (GPU runs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,feat_dtype", SCATTER_DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("rows,dim", [(77, 40), (4096, 4096), (1000, 3584), (33, 33), (70001, 8)])
def test_cuda_scatter_matches_masked_scatter(ext, dtype, feat_dtype, rows, dim):
    """16-byte and 1-element paths (dim 33), several scan steps (70001 rows > 32768 per step), cast in kernel."""
    embeds, mask, feats = _scatter_case(rows=rows, dim=dim, dtype=dtype, feat_dtype=feat_dtype, seed=rows,
                                        device="cuda")
    out, n = torch.ops.fastvlm_ext.scatter_image_features(embeds, mask, feats)
    assert out.is_cuda and n.is_cuda and int(n) == int(mask.sum())
    assert torch.equal(out, _masked_scatter(embeds, mask, feats))


@pytest.mark.gpu
def test_cuda_scatter_unaligned_and_strided(ext):
    """Misaligned pointers and row strides fall back to 1-element accesses; a mask at an odd byte offset."""
    embeds, mask, feats = _scatter_case(rows=300, dim=64, dtype=torch.bfloat16, device="cuda")
    buf = torch.randn(300 * 64 + 3, device="cuda").to(torch.bfloat16)
    e_odd = buf[3:].view(300, 64)
    e_odd.copy_(embeds)
    mbuf = torch.zeros(301, dtype=torch.bool, device="cuda")
    mbuf[1:] = mask
    wide = torch.randn(300, 72, device="cuda").to(torch.bfloat16)
    wide[:, 5:69] = embeds
    for e in (e_odd, wide[:, 5:69]):
        out, n = torch.ops.fastvlm_ext.scatter_image_features(e, mbuf[1:], feats)
        assert torch.equal(out, _masked_scatter(embeds, mask, feats))


@pytest.mark.gpu
def test_cuda_scatter_mismatch_without_sync(ext):
    """No host synchronisation in the op (sync debug mode raises on one); the count comes back on the device and
    the image-token rows are NaN."""
    embeds, mask, feats = _scatter_case(rows=5000, dim=256, dtype=torch.bfloat16, device="cuda")
    op = torch.ops.fastvlm_ext.scatter_image_features
    op(embeds, mask, feats)  # warm-up (allocator, module load)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, n = op(embeds, mask, feats[:-1])
        good, n_good = op(embeds, mask, feats)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(n) == int(mask.sum()) == int(n_good)
    assert out[mask].isnan().all() and torch.equal(out[~mask], embeds[~mask])
    assert torch.equal(good, _masked_scatter(embeds, mask, feats))


@pytest.mark.gpu
@pytest.mark.parametrize("grad", [False, True])
def test_cuda_scatter_opcheck(ext, grad):
    embeds, mask, feats = _scatter_case(dtype=torch.bfloat16, feat_dtype=torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.fastvlm_ext.scatter_image_features.default,
                          (embeds.requires_grad_(grad), mask, feats.requires_grad_(grad)))
