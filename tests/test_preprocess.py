"""fastvlm.ops.preprocess vs the Hugging Face image processors, after their resize: LLaVA's CLIPImageProcessor,
SiglipImageProcessor, Qwen2VLImageProcessor (and Qwen2VLVideoProcessor). The processors are built from their classes
with default arguments (no download) and fed images whose size they keep, so their resize (and center crop) is the
identity; the outputs must be equal bit for bit (the torchvision processors) or to fp32 rounding (the PIL ones).

Both the PyTorch path and the extension's CPU implementation are checked; on a GPU the CUDA kernel too.
"""
import pytest
import torch

from helpers import require_extension

from fastvlm.ops import preprocess as pp

transformers = pytest.importorskip("transformers")

BACKENDS = ["torch", "ext"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def _ext_module():
    """The extension, built at most once per session (shared with test_cext.py through fastvlm._cext's cache)."""
    return require_extension()


@pytest.fixture(params=BACKENDS)
def run(request):
    """Call a preprocess function on one backend: the PyTorch path, the extension's CPU op, or (GPU) its CUDA op."""
    if request.param != "torch":
        request.getfixturevalue("_ext_module")

    def call(fn, *args, **kw):
        if request.param == "cuda":
            out = fn(*args, device="cuda", **kw)
            return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
        return fn(*args, backend=request.param, **kw)

    call.backend = request.param
    return call


def _images(sizes, frames=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = frames or [1] * len(sizes)
    return [torch.randint(0, 256, ((f,) if f > 1 else ()) + (h, w, 3), dtype=torch.uint8, generator=g)
            for (h, w), f in zip(sizes, frames)]


def _processor(name):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    try:
        return cls()
    except ImportError as exc:  # e.g. torchvision missing for the torchvision-backed processors
        pytest.skip(f"{name}() needs {exc}")


TILE_PROCESSORS = ["CLIPImageProcessor", "SiglipImageProcessor"]  # LLaVA's vision tower is CLIP


@pytest.mark.parametrize("name", TILE_PROCESSORS)
@pytest.mark.parametrize("skip_resize", [False, True], ids=["identity-resize", "do_resize=False"])
def test_tiles_equal_hf(run, name, skip_resize):
    proc = _processor(name)
    imgs = _images([(224, 224)] * 3)
    kw = dict(do_resize=False, do_center_crop=False) if skip_resize else {}
    ref = proc([im.numpy() for im in imgs], return_tensors="pt", **kw).pixel_values
    out = run(pp.normalize_images, imgs, proc.image_mean, proc.image_std, rescale_factor=proc.rescale_factor)
    assert out.shape == ref.shape == (3, 3, 224, 224) and out.dtype == ref.dtype
    assert torch.equal(out, ref)
    stacked = run(pp.normalize_images, torch.stack(imgs), proc.image_mean, proc.image_std)  # [N, H, W, C] input
    assert torch.equal(stacked, ref)


@pytest.mark.parametrize("name", TILE_PROCESSORS)
def test_tiles_bf16_equal_hf_cast(run, name):
    proc = _processor(name)
    imgs = _images([(224, 224)] * 2, seed=1)
    ref = proc([im.numpy() for im in imgs], return_tensors="pt").pixel_values
    out = run(pp.normalize_images, imgs, proc.image_mean, proc.image_std, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))


@pytest.mark.parametrize("flags", [dict(do_rescale=False), dict(do_normalize=False)])
def test_tiles_rescale_or_normalize_only(run, flags):
    proc = _processor("SiglipImageProcessor")
    imgs = _images([(224, 224)] * 2, seed=2)
    ref = proc([im.numpy() for im in imgs], return_tensors="pt", **flags).pixel_values
    out = run(pp.normalize_images, imgs, proc.image_mean, proc.image_std, **flags)
    assert torch.equal(out, ref)


QWEN_SIZES = [(56, 84), (112, 56), (224, 336), (28 * 4, 28 * 3)]  # multiples of 28, >= 56*56 pixels: kept as is


@pytest.mark.parametrize("skip_resize", [False, True], ids=["identity-resize", "do_resize=False"])
def test_qwen2vl_equal_hf(run, skip_resize):
    proc = _processor("Qwen2VLImageProcessor")
    imgs = _images(QWEN_SIZES, seed=3)
    kw = dict(do_resize=False) if skip_resize else {}
    ref = proc([im.numpy() for im in imgs], return_tensors="pt", **kw)
    out, thw = run(pp.qwen2vl_patchify, imgs, proc.image_mean, proc.image_std, patch_size=proc.patch_size,
                   merge_size=proc.merge_size, temporal_patch_size=proc.temporal_patch_size)
    assert torch.equal(thw, ref.image_grid_thw)
    assert out.shape == ref.pixel_values.shape and out.dtype == ref.pixel_values.dtype
    assert torch.equal(out, ref.pixel_values)


def test_qwen2vl_flat_buffer_bf16(run):
    """The transfer-friendly form: one flat uint8 buffer plus sizes; bf16 out equals HF's fp32 cast to bf16."""
    proc = _processor("Qwen2VLImageProcessor")
    imgs = _images(QWEN_SIZES[:3], seed=4)
    ref = proc([im.numpy() for im in imgs], return_tensors="pt")
    flat = torch.cat([im.reshape(-1) for im in imgs])
    out, thw = run(pp.qwen2vl_patchify, flat, proc.image_mean, proc.image_std, sizes=[im.shape[:2] for im in imgs],
                   channels=3, dtype=torch.bfloat16)
    assert torch.equal(thw, ref.image_grid_thw)
    assert torch.equal(out, ref.pixel_values.to(torch.bfloat16))


def test_qwen2vl_video_equal_hf(run):
    """Videos: frames grouped by temporal_patch_size, the last frame repeated to fill the last group."""
    proc = _processor("Qwen2VLVideoProcessor")
    vids = _images([(56, 84), (84, 56)], frames=[3, 4], seed=5)
    ref = proc(videos=[v.numpy() for v in vids], return_tensors="pt", do_resize=False, do_sample_frames=False)
    out, thw = run(pp.qwen2vl_patchify, vids, proc.image_mean, proc.image_std)
    assert torch.equal(thw, ref.video_grid_thw)
    assert torch.equal(out, ref.pixel_values_videos)


PIL_PROCESSORS = [("clip", "CLIPImageProcessorPil", "normalize_images", 224),
                  ("siglip", "SiglipImageProcessorPil", "normalize_images", 224),
                  ("qwen2_vl", "Qwen2VLImageProcessorPil", "qwen2vl_patchify", 112)]


@pytest.mark.parametrize("module,name,fn,size", PIL_PROCESSORS, ids=[p[1] for p in PIL_PROCESSORS])
def test_pil_processors_to_fp32_rounding(module, name, fn, size):
    """The PIL/numpy processors rescale and normalise in separate steps: equal up to fp32 rounding."""
    import importlib

    try:
        mod = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
        proc = getattr(mod, name)()
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"{name} unavailable in transformers {transformers.__version__}: {exc}")
    imgs = _images([(size, size)] * 2, seed=6)
    ref = proc([im.numpy() for im in imgs], return_tensors="pt").pixel_values
    out = getattr(pp, fn)(imgs, proc.image_mean, proc.image_std, backend="torch")
    out = out[0] if isinstance(out, tuple) else out
    eps = torch.finfo(torch.float32).eps
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref.float(), rtol=4 * eps, atol=4 * eps)


def test_input_validation():
    imgs = _images([(56, 84)])
    with pytest.raises(ValueError, match="multiples of patch_size"):
        pp.qwen2vl_patchify(_images([(50, 84)]), backend="torch")
    with pytest.raises(ValueError, match="larger than"):
        pp.normalize_images(imgs, 0.5, 0.5, out_size=(28, 28), backend="torch")
    with pytest.raises(TypeError, match="uint8"):
        pp.normalize_images([imgs[0].float()], 0.5, 0.5, backend="torch")
    with pytest.raises(ValueError, match="does not fit"):
        pp.normalize_images(imgs[0].reshape(-1), 0.5, 0.5, sizes=[(57, 84)], channels=3, backend="torch")
    with pytest.raises(ValueError, match="2 values for 3 channels"):
        pp.normalize_images(imgs, [0.5, 0.5], [0.5, 0.5, 0.5], backend="torch")
