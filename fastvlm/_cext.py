"""fastvlm's optional CUDA C++ extension (csrc/): find it, build it on first use, and say why it is unavailable.

The extension registers the ``torch.ops.fastvlm_ext`` ops (CPU, Meta and CUDA implementations; ``load()`` adds the
autograd formula of ``scatter_image_features`` from Python). It is found, in order, as

1. ``fastvlm._C``, built by ``FASTVLM_BUILD_CUDA=1 pip install .`` (setup.py; a copy built against another torch
   does not import and is passed over, with the reason kept, for the JIT build below);
2. a JIT build of csrc/ cached under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/fastvlm/torch_extensions``, in a
   folder keyed by the sources, torch, Python, the CUDA toolkit and the target architectures;
3. a new JIT build (``torch.utils.cpp_extension.load`` with ninja, in a subprocess: 30 s to 2 min on 2 cores),
   made only when ``load(build=True)`` is asked for, e.g. by the first preprocessing call on CUDA tensors.

Nothing here runs at ``import fastvlm``. Without nvcc, ninja, a compiler or the csrc/ sources, ``load()`` returns
None and ``available()`` gives the reason. ``FASTVLM_CEXT=0`` disables the extension, ``FASTVLM_CEXT=nobuild``
uses a prebuilt or cached build but never starts one. ``python -m fastvlm._cext build`` builds it ahead of time;
``python -m fastvlm._cext status`` prints ``status()``.

This file imports only the standard library at module level: setup.py loads it by path for the build settings
(``build_settings()``), without importing fastvlm or torch.
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ABI_VERSION = 2  # must equal FASTVLM_EXT_ABI_VERSION in csrc/ops.cpp
EXT_NAME = "fastvlm_ext"
NAMESPACE = "fastvlm_ext"
DEFAULT_ARCH_LIST = "9.0a"  # without a visible GPU (torch cannot query one); H100/H200
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("ops.cpp", "launch.cu")
OPS = ("normalize_tiles", "qwen2vl_patchify", "scatter_image_features")


def _find_csrc() -> str:
    """csrc/ beside the package (editable install, source checkout), or shipped inside it as fastvlm/csrc."""
    candidates = (os.path.join(os.path.dirname(_HERE), "csrc"), os.path.join(_HERE, "csrc"))
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, s)) for s in SOURCES):
            return folder
    return candidates[0]


CSRC = _find_csrc()

_lock = threading.RLock()
_module = None
_origin = ""
_failure: tuple[str, str] | None = None  # (kind, reason) cached for the process: build-failed, stale, unavailable
_last_reason = "not loaded yet"


# ---------------------------------------------------------------- build settings (no torch import needed)


def csrc_dir() -> str | None:
    """The csrc/ folder next to the package (an editable install or a source checkout), or None."""
    return CSRC if all(os.path.isfile(os.path.join(CSRC, s)) for s in SOURCES) else None


def _has_cudart(root: str) -> bool:
    return any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib64", "lib"))


def find_cuda_home() -> str | None:
    """A CUDA toolkit root with bin/nvcc and libcudart: $CUDA_HOME, $CUDA_PATH, the nvcc on PATH, /usr/local/cuda.

    torch guesses the root from the nvcc on PATH; when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc) the
    guess has no lib64 and the link fails with "cannot find -lcudart", hence this search.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            return os.path.abspath(root)
    return None


def extra_include_paths() -> list[str]:
    """csrc/ and the CUDA headers of the torch wheel's nvidia packages (cusparse.h & co., which a toolkit assembled
    from pip wheels lacks), located without importing torch."""
    paths = [CSRC]
    spec = importlib.util.find_spec("torch")
    if spec and spec.origin:
        site = os.path.dirname(os.path.dirname(spec.origin))
        paths += sorted(glob.glob(os.path.join(site, "nvidia", "cu1[0-9]", "include")), reverse=True)[:1]
    return [p for p in paths if os.path.isdir(p)]


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPUs' architectures; else 9.0a (no GPU to query)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return env
    try:
        import torch

        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            return ";".join(f"{a}.{b}" for a, b in sorted(caps))
    except Exception:
        pass
    return DEFAULT_ARCH_LIST


def build_settings() -> dict:
    """Compiler settings shared by setup.py and the JIT build."""
    return {
        "include_dirs": extra_include_paths(),
        "cxx_flags": ["-O3"],
        "nvcc_flags": ["-O3", "-lineinfo"],
        "env": {"CUDA_HOME": find_cuda_home() or "", "TORCH_CUDA_ARCH_LIST": arch_list(),
                "MAX_JOBS": os.environ.get("MAX_JOBS") or str(max(1, min(4, os.cpu_count() or 1)))},
    }


def build_problems() -> list[str]:
    """Why a JIT build cannot be attempted here (empty when it can)."""
    problems = []
    if csrc_dir() is None:
        problems.append(f"the csrc/ sources are not installed ({CSRC}); use an editable install (pip install -e .) "
                        "or FASTVLM_BUILD_CUDA=1 pip install .")
    try:
        import torch

        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} is a CPU-only build")
    except Exception as exc:  # pragma: no cover
        problems.append(f"torch cannot be imported ({type(exc).__name__}: {exc})")
    if find_cuda_home() is None:
        problems.append("no CUDA toolkit found (nvcc and libcudart under $CUDA_HOME, the nvcc on PATH or "
                        "/usr/local/cuda)")
    if importlib.util.find_spec("setuptools") is None:
        problems.append("setuptools is not installed (torch.utils.cpp_extension imports it)")
    if shutil.which("ninja") is None:
        problems.append("ninja is not installed (pip install ninja)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        problems.append(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    return problems


def _cache_root() -> str:
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastvlm", "torch_extensions")


def build_dir() -> str:
    """The JIT build folder: a new one whenever the sources, torch, Python, CUDA or the architectures change."""
    import torch

    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(CSRC, "*"))):
        if path.endswith((".cpp", ".cu", ".cuh", ".h")):
            h.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    key = [torch.__version__, str(torch.version.cuda), sys.version, find_cuda_home() or "", arch_list(),
           str(ABI_VERSION), json.dumps(build_settings()["nvcc_flags"])]
    h.update("\0".join(key).encode())
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    tv = torch.__version__.replace("+", "_")
    return os.path.join(_cache_root(), f"{EXT_NAME}-{py}-torch{tv}-{h.hexdigest()[:16]}")


def _so_path(folder: str) -> str:
    return os.path.join(folder, EXT_NAME + (".pyd" if sys.platform == "win32" else ".so"))


# ---------------------------------------------------------------- loading


def _mode() -> str:
    value = os.environ.get("FASTVLM_CEXT", "auto").strip().lower() or "auto"
    if value in ("0", "off", "false", "no"):
        return "off"
    return "nobuild" if value == "nobuild" else "auto"


def _namespace_registered() -> bool:
    import torch

    try:
        return bool(torch._C._jit_get_schemas_for_operator(f"{NAMESPACE}::normalize_tiles"))
    except Exception:  # pragma: no cover
        return False


def _fail(kind: str, reason: str, cache: bool = True):
    global _failure, _last_reason
    _last_reason = reason
    if cache:
        _failure = (kind, reason)
    return None


def _accept(mod, origin: str):
    global _module, _origin, _last_reason
    version = getattr(mod, "ABI_VERSION", None)
    if version != ABI_VERSION:
        return _fail("stale", f"{origin} has ABI version {version}, this fastvlm needs {ABI_VERSION}: rebuild it "
                              "(FASTVLM_BUILD_CUDA=1 pip install .)")
    _register_autograd()
    _module, _origin, _last_reason = mod, origin, ""
    return mod


_autograd_registered = False


def _scatter_setup(ctx, inputs, output):
    _, mask, features = inputs
    ctx.save_for_backward(mask)
    ctx.feat_dtype = features.dtype


def _scatter_backward(ctx, g_out, _g_count):
    """Text rows' gradient to inputs_embeds, image rows' (in order) to image_features; none to the mask."""
    (mask,) = ctx.saved_tensors
    g_embeds = g_out.masked_fill(mask[:, None].to(bool), 0) if ctx.needs_input_grad[0] else None
    g_feat = g_out[mask.to(bool)].to(ctx.feat_dtype) if ctx.needs_input_grad[2] else None
    return g_embeds, None, g_feat


def _register_autograd() -> None:
    """The backward of fastvlm_ext::scatter_image_features (the C++ library registers CPU/Meta/CUDA only)."""
    global _autograd_registered
    if _autograd_registered:
        return
    import torch

    torch.library.register_autograd(f"{NAMESPACE}::scatter_image_features", _scatter_backward,
                                    setup_context=_scatter_setup)
    _autograd_registered = True


def _import_path(path: str):
    spec = importlib.util.spec_from_file_location(EXT_NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(build: bool = True):
    """The extension module (its import registers ``torch.ops.fastvlm_ext``), or None: ``available()`` says why.

    ``build=False`` only looks for a prebuilt or cached build (fast); ``build=True`` may start a JIT build.
    """
    if _mode() == "off":
        _fail("disabled", "disabled by FASTVLM_CEXT=0", cache=False)
        return None
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            _fail(*_failure)
            return None
        import torch  # noqa: F401  (the extension links against torch's libraries)

        stale = ""
        try:
            prebuilt = importlib.import_module("fastvlm._C")
        except ModuleNotFoundError:
            prebuilt = None
        except ImportError as exc:  # built against another torch: dlopen fails before anything is registered
            prebuilt, stale = None, f"fastvlm._C exists but does not import ({exc}); "
        if prebuilt is not None:
            return _accept(prebuilt, f"prebuilt fastvlm._C ({prebuilt.__file__})")
        if _namespace_registered():
            return _fail("stale", f"torch.ops.{NAMESPACE} is already registered by another library in this process")
        folder = build_dir() if csrc_dir() else None
        so = _so_path(folder) if folder else None
        if so is None or not os.path.isfile(so):  # no cached build: can one be made here?
            problems = build_problems()
            if problems:
                return _fail("stale" if stale else "unavailable",
                             stale + "cannot build the CUDA extension: " + "; ".join(problems))
            if not build or _mode() == "nobuild":
                why = "FASTVLM_CEXT=nobuild" if build else "build=False"
                return _fail("stale" if stale else "not-built",
                             stale + f"not built yet ({why}); `python -m fastvlm._cext build` builds it "
                                     f"into {folder}", cache=False)
            err = _build(folder)
            if err:
                return _fail("build-failed", err)
        try:
            mod = _import_path(so)
        except Exception as exc:
            return _fail("build-failed", f"{so} does not import ({type(exc).__name__}: {exc}); delete {folder} to "
                                         "rebuild")
        return _accept(mod, f"JIT build {so}")


def available(build: bool = True) -> tuple[bool, str]:
    """(True, "") when the extension is loaded (building it if needed and ``build``), else (False, reason)."""
    mod = load(build=build)
    return (mod is not None, "" if mod is not None else _last_reason)


def failure_kind() -> str | None:
    """Why the last load() failed: disabled, unavailable (a requirement is missing), not-built, build-failed, stale;
    None when loaded."""
    if _module is not None and _mode() != "off":
        return None
    if _mode() == "off":
        return "disabled"
    return _failure[0] if _failure else "not-built"


def status() -> str:
    """One line for ``fastvlm info``; never starts a build."""
    mod = load(build=False)
    if mod is not None:
        return f"loaded: {_origin}; ops torch.ops.{NAMESPACE}.{{{','.join(OPS)}}}"
    kind = failure_kind()
    if kind == "not-built":
        return ("not built yet: builds on the first preprocessing call on CUDA tensors (30 s to 2 min), or run "
                "`python -m fastvlm._cext build`")
    return f"{kind}: {_last_reason}"


# ---------------------------------------------------------------- building (in a subprocess)


def _build(folder: str) -> str:
    """Build into ``folder`` in a subprocess; return "" or the reason it failed (with the log's tail)."""
    os.makedirs(folder, exist_ok=True)
    settings = build_settings()
    env = dict(os.environ)
    env.update(settings["env"])
    env["PATH"] = os.path.join(settings["env"]["CUDA_HOME"], "bin") + os.pathsep + env.get("PATH", "")
    log_path = os.path.join(folder, "build.log")
    args = json.dumps({"folder": folder, "include_dirs": settings["include_dirs"],
                       "cxx_flags": settings["cxx_flags"], "nvcc_flags": settings["nvcc_flags"]})
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('_fastvlm_cext', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); sys.exit(m._build_main(sys.argv[2]))")
    timeout = float(os.environ.get("FASTVLM_CEXT_BUILD_TIMEOUT", "1800"))
    print(f"fastvlm: building the CUDA extension {EXT_NAME} (first use; 30 s to 2 min on 2 cores; "
          f"TORCH_CUDA_ARCH_LIST={settings['env']['TORCH_CUDA_ARCH_LIST']}) in {folder}", file=sys.stderr, flush=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-c", code, os.path.abspath(__file__), args], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    elapsed = time.monotonic() - start
    if rc == 0 and os.path.isfile(_so_path(folder)):
        print(f"fastvlm: built {EXT_NAME} in {elapsed:.0f} s", file=sys.stderr, flush=True)
        return ""
    with open(log_path, errors="replace") as f:
        lines = f.readlines()
    # compiler diagnostics first (they sit above the Python traceback), then the end of the log
    errors = [ln for ln in lines if ": error" in ln or "error:" in ln][:20]
    tail = "".join(errors + ["...\n"] + lines[-8:])
    what = f"timed out after {timeout:.0f} s" if rc is None else f"failed (exit {rc}) after {elapsed:.0f} s"
    return f"the JIT build {what}; log {log_path}:\n{tail}"


def _build_main(arg: str) -> int:
    """Runs in the build subprocess, with CUDA_HOME / TORCH_CUDA_ARCH_LIST / MAX_JOBS already in the environment."""
    cfg = json.loads(arg)
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=EXT_NAME,
        sources=[os.path.join(CSRC, s) for s in SOURCES],
        extra_include_paths=cfg["include_dirs"],
        extra_cflags=cfg["cxx_flags"],
        extra_cuda_cflags=cfg["nvcc_flags"],
        build_directory=cfg["folder"],
        with_cuda=True,
        is_python_module=False,  # loads it with torch.ops.load_library: the ops must register
        verbose=True,
    )
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "status"
    if cmd == "build":
        ok, why = available(build=True)
        print(f"fastvlm CUDA extension: {status() if ok else why}")
        return 1 if failure_kind() in ("build-failed", "stale") else 0
    if cmd == "status":
        print(f"fastvlm CUDA extension: {status()}")
        return 0
    print("usage: python -m fastvlm._cext {status,build}")
    return 2


if __name__ == "__main__":
    from fastvlm import _cext as _canonical  # one module state per process, whichever way it was started

    sys.exit(_canonical.main())
