"""The CUDA C++ extension (csrc/): every .cuh compiled by nvcc; the extension built once and imported; its CPU and
Meta implementations against the PyTorch reference and torch.library.opcheck; CUDA parity on a GPU (marked gpu).

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

CSRC = _cext.CSRC
HEADERS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CSRC, "*.cuh")))
TORCH_FREE = HEADERS + ["launch.h", "launch.cu", "preprocess_cpu.h"]
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
    ok, why = _cext.available(build=True)
    if not ok:
        if _cext.failure_kind() in ("build-failed", "stale"):
            pytest.fail(f"the CUDA extension failed to build or load: {why}")
        pytest.skip(f"CUDA extension not available: {why}")
    return _cext.load()


@pytest.fixture(scope="module")
def ext():
    return ext_or_skip()


# ---------------------------------------------------------------- source checks (no build)


def test_headers_exist():
    assert {"common.cuh", "preprocess.cuh"} <= set(HEADERS)


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
    assert len(entries) == 6 and sum("patchify" in e for e in entries) == 3, entries


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
    for op in ("normalize_tiles", "qwen2vl_patchify"):
        assert hasattr(torch.ops.fastvlm_ext, op)
    assert _cext.status().startswith("loaded: ")
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
