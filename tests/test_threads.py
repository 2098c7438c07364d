"""One patched model called from several threads at once (issue 17): every family whose fused path pairs modules
of a parent (CLIP's pre-norm, timm's VisionTransformer, Pixtral, Qwen3-VL's positions) or switches a mode for the
length of a call (Qwen-VL still images mixed with video calls), the Q-Former (its weight cache), and a LLaVA model
end to end. Each thread calls the same patched model with inputs of its own; every output must equal the unpatched
model's within the project's tolerance, and no call may raise.

The inputs differ in size where a cache is keyed on size (interpolated position tables), and some calls record
autograd (the Q-Former's cache key), so that the threads also fill and replace the caches concurrently. A very short
interpreter switch interval makes the threads interleave inside the model's Python code, where the races are: on
the PyTorch path, 240 calls per family (before the fix, 1-20% of them were wrong or raised). With the kernels in
the Triton interpreter (not thread-safe itself: its launches are serialised, a second or so each) a few calls check
that the kernel paths hold up too; fastvlm's per-call state is the same code on both paths. A still-image call and
two video calls in a fixed interleaving check the mode (a race too rare to show at random), and a GPU variant puts
each thread on a CUDA stream of its own.
"""
import contextlib
import copy
import math
import sys
import threading
import warnings

import pytest
import torch

import fastvlm
from fastvlm.testing import rel_err, tolerance

# (threads, calls per thread) by backend: "triton" runs the kernels in the interpreter (about a second a launch, one
# launch at a time: fewer calls), "auto" runs them on a GPU
LOAD = {"torch": (6, 40), "triton": (2, 2), "auto": (6, 40)}


@pytest.fixture(autouse=True)
def _interleave():
    """Switch threads every microsecond (the default 5 ms lets a tiny model's call finish in one slice)."""
    before, intra = sys.getswitchinterval(), torch.get_num_threads()
    sys.setswitchinterval(1e-6)
    torch.set_num_threads(1)  # the threads are the parallelism here (and tiny ops do not gain from more)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
            yield
    finally:
        sys.setswitchinterval(before)
        torch.set_num_threads(intra)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _hammer(call, cases, refs, k, roundings, threads, calls, streams=False):
    """``threads`` threads call ``call(case)`` ``calls`` times each, each thread going through the cases in its own
    order (on a CUDA stream of its own with ``streams``); returns (wrong outputs, exceptions) as lists of strings."""
    wrong, raised = [], []
    start = threading.Barrier(threads)

    def worker(t):
        stream = torch.cuda.Stream() if streams else None
        start.wait()
        for j in range(calls):
            i = (t + j * (t + 1)) % len(cases)
            try:
                with torch.no_grad(), (torch.cuda.stream(stream) if streams else contextlib.nullcontext()):
                    outs = call(cases[i])
                if streams:
                    stream.synchronize()
            except Exception as exc:  # noqa: BLE001 (every exception is a failure, reported below)
                raised.append(f"case {i}: {type(exc).__name__}: {exc}")
                continue
            for n, (out, ref) in enumerate(zip(outs, refs[i])):
                err = rel_err(out.detach(), ref)
                bound = tolerance(ref.dtype, k, roundings)
                if out.shape != ref.shape or not math.isfinite(err) or err > bound:
                    wrong.append(f"case {i} output {n}: rel err {err:.2e} > {bound:.2e}")

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    return wrong, raised


def _one_interpreted_launch_at_a_time(monkeypatch):
    """The Triton interpreter is not thread-safe (a launch patches triton.language and keeps its grid in globals;
    two interpreted launches at once fail inside triton, not fastvlm). Serialise the launches only: everything
    fastvlm does around them (pairing hand-offs, modes, caches) still runs concurrently."""
    from triton.runtime import interpreter

    launch = interpreter.GridExecutor.__call__
    lock = threading.Lock()

    def serialised(self, *args, **kwargs):
        with lock:
            return launch(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", serialised)


def _run(backend, monkeypatch, build, patch_kw=None, k=588, roundings=4, device="cpu"):
    """Reference outputs from the unpatched model (one thread), then the patched model from several threads (on
    CUDA: each thread on a stream of its own)."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    if backend == "triton":
        _one_interpreted_launch_at_a_time(monkeypatch)
    model, cases, call = build()
    model, cases = model.to(device), _to(cases, device)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        refs = [[o.clone() for o in call(ref_model, c)] for c in cases]
    report = fastvlm.patch(model, **(patch_kw or {}))
    assert report.patched, str(report)
    if device == "cuda":
        torch.cuda.synchronize()
    threads, calls = LOAD[backend]
    wrong, raised = _hammer(lambda c: call(model, c), cases, refs, k, roundings, threads, calls,
                            streams=device == "cuda")
    n = threads * calls
    assert not raised and not wrong, (f"{len(raised)} exceptions and {len(wrong)} wrong outputs in {n} calls: "
                                      + "; ".join((raised + wrong)[:4]))


BACKENDS = ["torch", "triton"]


def _clip_build():
    import transformers

    from fastvlm.testing import randomize_

    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=1, image_size=21, patch_size=7)
    m = randomize_(transformers.CLIPVisionModel(cfg)).eval()
    # native size, another size (an interpolated table, cached per size), with and without the hidden states
    cases = [(torch.randn(2, 3, 21, 21), False, False), (torch.randn(1, 3, 28, 28), True, True),
             (torch.randn(3, 3, 21, 21), False, True), (torch.randn(2, 3, 14, 35), True, False)]

    def call(model, case):
        x, interp, hidden = case
        out = model(x, interpolate_pos_encoding=interp, output_hidden_states=hidden)
        return (out.last_hidden_state,) + ((out.hidden_states[0],) if hidden else ())

    return m, cases, call


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_pre_norm(backend, monkeypatch):
    _run(backend, monkeypatch, _clip_build)


def _timm_build():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    from fastvlm.testing import randomize_

    m = randomize_(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=2,
                                     pre_norm=True, dynamic_img_size=True)).eval()
    cases = [torch.randn(2, 3, 32, 32), torch.randn(1, 3, 40, 24), torch.randn(3, 3, 16, 48)]
    return m, cases, lambda model, x: (model.forward_features(x),)


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_vit(backend, monkeypatch):
    _run(backend, monkeypatch, _timm_build, k=192)


def _pixtral_build():
    from transformers import PixtralVisionConfig
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

    from fastvlm.testing import randomize_

    cfg = PixtralVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              head_dim=12, patch_size=7, image_size=56)
    m = randomize_(PixtralVisionModel(cfg).eval(), std=0.05)
    with torch.no_grad():
        m.ln_pre.weight.copy_(1 + 0.1 * torch.randn(48))
    cases = []
    for sizes in ([[42, 56], [28, 35]], [[42, 56], [42, 56]], [[14, 28], [35, 21]], [[28, 14]]):
        x = torch.randn(len(sizes), 3, 42, 56)
        for b, (h, w) in enumerate(sizes):  # padded as the processor pads
            x[b, :, h:] = 0
            x[b, :, :, w:] = 0
        cases.append((x, torch.tensor(sizes)))
    return m, cases, lambda model, c: (model(c[0], image_sizes=c[1]).last_hidden_state,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixtral(backend, monkeypatch):
    _run(backend, monkeypatch, _pixtral_build)


def _qwen3_build():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionConfig, Qwen3VLVisionModel

    from fastvlm.testing import randomize_

    cfg = Qwen3VLVisionConfig(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                              patch_size=8, num_position_embeddings=16, deepstack_visual_indexes=[])
    torch.manual_seed(0)
    visual = randomize_(Qwen3VLVisionModel(cfg).eval(), std=0.2)
    K = visual.patch_embed.proj.weight[0].numel()
    cases = []
    for grid in ([1, 4, 4], [1, 2, 6], [2, 2, 2], [1, 6, 2]):
        g = torch.tensor([grid])
        cases.append((torch.randn(int(g.prod()), K), g))
    return visual, cases, lambda model, c: (model(c[0], grid_thw=c[1]).last_hidden_state,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen3_vl_positions(backend, monkeypatch):
    _run(backend, monkeypatch, _qwen3_build, k=1536)


def _qwen2_still_build():
    import transformers

    from fastvlm.tiny_models import build_config

    cfg = build_config("qwen2_vl")
    cfg.vision_config.patch_size, cfg.vision_config.depth = 7, 1
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    conv = model.model.visual.patch_embed.proj
    T, K = conv.kernel_size[0], conv.weight[0].numel()
    cases = []
    for video, grid in ((False, [1, 4, 4]), (True, [1, 4, 4]), (False, [1, 2, 6]), (True, [2, 2, 2])):
        g = torch.tensor([grid])
        n = int(g.prod())
        px = torch.randn(n, K)
        if not video:  # an image as the processor builds it: its frame repeated T times
            frame = px.view(n, 3, T, -1)[:, :, :1]
            px = frame.expand(n, 3, T, frame.shape[-1]).reshape(n, K).contiguous()
        cases.append((video, px, g))

    def call(m, c):
        video, px, g = c
        out = m.get_video_features(px, g) if video else m.get_image_features(px, g)
        return tuple(out.pooler_output)

    return model.model, cases, call


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen2_vl_still_images_and_videos(backend, monkeypatch):
    _run(backend, monkeypatch, _qwen2_still_build, patch_kw=dict(still_images=True), k=1176)


def test_still_image_and_video_calls_interleaved(torch_backend):
    """A fixed interleaving of one image call and two video calls (forward pre-hooks on the patch embedding hold each
    thread at the point where the embedding picks its mode): the second video call reads its mode after the first
    one returned while the image call is still open. Each call must keep its own mode (the image call the halved
    GEMM, the videos the full kernel), and each thread's ``fastvlm.trace()`` holds its own call only."""
    model, cases, call = _qwen2_still_build()
    ref_model = copy.deepcopy(model)
    image, video = cases[0], cases[3]
    with torch.no_grad():
        refs = {"image": call(ref_model, image), "video": call(ref_model, video)}
    fastvlm.patch(model, still_images=True)
    ev = {k: threading.Event() for k in ("image_in", "v1_in", "v2_in", "v1_done", "v2_done")}

    def wait(name):
        assert ev[name].wait(60), f"timed out waiting for {name}"

    def at_embedding(module, args):  # runs in the calling thread, just before the embedding picks its mode
        role = threading.current_thread().name
        if role == "image":
            ev["image_in"].set()
            wait("v2_done")
        elif role == "v1":
            wait("image_in")
            wait("v2_in")
        elif role == "v2":
            ev["v2_in"].set()
            wait("v1_done")

    model.visual.patch_embed.register_forward_pre_hook(at_embedding)
    got, traces, errors = {}, {}, []

    def run(role):
        try:
            with torch.no_grad(), fastvlm.trace() as t:
                got[role] = call(model, image if role == "image" else video)
            traces[role] = [r.detail for r in t.records if r.op == "fastvlm::rows_embed"]
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{role}: {type(exc).__name__}: {exc}")
            for e in ev.values():
                e.set()  # release the others
        finally:
            if role in ("v1", "v2"):
                ev[f"{role}_done"].set()

    threads = [threading.Thread(target=run, args=(role,), name=role) for role in ("image", "v1", "v2")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for role, out in got.items():
        ref = refs["image" if role == "image" else "video"]
        for a, b in zip(out, ref):
            assert rel_err(a, b) <= tolerance(torch.float32, 1176, 4), role
    assert len(traces["image"]) == 1 and "still" in traces["image"][0], traces
    assert all(len(traces[v]) == 1 and "still" not in traces[v][0] for v in ("v1", "v2")), traces


def _qformer_build():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             encoder_hidden_size=40, cross_attention_frequency=1, initializer_range=0.15)
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.qformer = Blip2QFormerModel(cfg).eval()  # a child: fastvlm.patch swaps submodules, not the model it is given
    cases = [(torch.randn(b, q, 32), torch.randn(b, k, 40), grad)
             for b, q, k, grad in ((1, 8, 20, False), (2, 4, 33, True), (3, 8, 9, False), (1, 2, 50, True))]

    def call(model, c):
        q, e, grad = c
        with torch.set_grad_enabled(grad):  # recording autograd is another key of the concatenated-weight cache
            return (model.qformer(query_embeds=q, encoder_hidden_states=e).last_hidden_state,)

    return m, cases, call


@pytest.mark.parametrize("backend", BACKENDS)
def test_qformer(backend, monkeypatch):
    _run(backend, monkeypatch, _qformer_build, k=64)


def _llava_build():
    from fastvlm.tiny_models import build_tiny_model

    model, inputs = build_tiny_model("llava")
    px = inputs["pixel_values"]
    cases = [dict(inputs, pixel_values=torch.randn_like(px)) for _ in range(3)]
    return model, cases, lambda m, c: (m(**c).logits,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llava_end_to_end(backend, monkeypatch):
    _run(backend, monkeypatch, _llava_build, k=588)


# (builder, patch arguments, reduction length) of each family above, for the CUDA-stream test
FAMILIES = {"clip": (_clip_build, None, 588), "timm": (_timm_build, None, 192), "pixtral": (_pixtral_build, None, 588),
            "qwen3_vl": (_qwen3_build, None, 1536),
            "qwen2_vl_still": (_qwen2_still_build, dict(still_images=True), 1176),
            "qformer": (_qformer_build, None, 64), "llava": (_llava_build, None, 588)}


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_streams(family, monkeypatch):
    """The same on a GPU, each thread on a CUDA stream of its own (the shared caches are filled on one stream and
    read on the others)."""
    build, patch_kw, k = FAMILIES[family]
    _run("auto", monkeypatch, build, patch_kw=patch_kw, k=k, device="cuda")


def test_shared_caches_fill_from_threads():
    """fastvlm._cache: threads that keep missing and evicting (more keys than room) always get their own key's
    value; a per-module slot replaced by other keys and sources likewise; a module ``__dict__`` holding an entry
    deep-copies."""
    from fastvlm._cache import shared_cache, slot

    @shared_cache(2)
    def table(n, device):
        return torch.arange(n, device=torch.device(device)) * n

    store, wrong = {}, []
    start = threading.Barrier(4)

    def worker(t):
        start.wait()
        for j in range(300):
            n = 1 + (t * 7 + j) % 5
            if not torch.equal(table(n, "cpu"), torch.arange(n) * n):
                wrong.append(("table", n))
            source = j % 3 == 0  # a new source (table version) every few calls drops the other keys
            v = slot(store, "cache", source, n, lambda: torch.full((n,), float(n) + source))
            if not torch.equal(v, torch.full((n,), float(n) + source)):
                wrong.append(("slot", n))

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    assert not wrong, wrong[:5]
    copied = copy.deepcopy(store)
    assert copied["cache"].source == store["cache"].source


def _factories():
    """Every class factory of fastvlm.nn.REGISTRY with a recipe whose original class imports, plus the paired-norm
    and structural factories."""
    import fastvlm.nn as fnn

    out = []
    for recipes, factory in fnn.REGISTRY:
        for r in recipes:
            try:
                factory(r)
            except ImportError:
                continue
            out.append((factory.__name__, factory, (r,)))
            break
    from fastvlm.nn.pair_prenorm import _make_paired_norm_class

    out.append(("_make_paired_norm_class", _make_paired_norm_class, (torch.nn.LayerNorm,)))
    return out


@pytest.mark.parametrize("name,factory,args", _factories(), ids=lambda v: v if isinstance(v, str) else "")
def test_fused_class_factories_build_one_class_per_key(name, factory, args, monkeypatch):
    """Two threads patching at once must get the same Fused<Original> class for a recipe (with an lru_cache, both
    missed the cache, both built a class, and each got its own: isinstance checks and the class-level patch then
    disagree). The build is slowed down so that every thread misses the cache at once."""
    import importlib
    import time

    real_import = importlib.import_module

    def slow_import(*a, **kw):
        time.sleep(0.02)
        return real_import(*a, **kw)

    kept = dict(getattr(factory, "values", {}))  # restored after: other tests hold the classes built so far
    factory.cache_clear()
    monkeypatch.setattr(importlib, "import_module", slow_import)
    n = 6
    barrier, got = threading.Barrier(n), [None] * n

    def worker(i):
        barrier.wait()
        got[i] = factory(*args)

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(g is not None for g in got)
        assert len({id(g) for g in got}) == 1, f"{name}: {len({id(g) for g in got})} classes for one key"
    finally:
        if hasattr(factory, "values"):
            factory.values.clear()
            factory.values.update(kept)
