"""Host time per call: every fused module next to its original, on the same tiny tensors (batch-1 latency).

At batch 1 a connector's kernels run for microseconds on an H100, so what a user waits for is the Python work before
each launch. This suite measures it per module family: the original transformers module's eager call and the fused
module's call on the same tiny inputs, interleaved rounds, min and median in microseconds.

* On a GPU the fused modules go through the real launch path (the host time of an eager call; the loop is not
  synchronised, and tiny kernels finish long before the host queues the next ones).
* On a CPU, ``fastvlm.bench.fake_driver`` makes Triton compile for sm_90 and run its whole Python launch path on
  CPU tensors, replacing only the final C launch (nothing is computed, so outputs are garbage: only time is read).
  The original module's eager CPU time at tiny sizes approximates its host time on a GPU. This process must not
  have TRITON_INTERPRET=1 set.

Cases: each connector / embedding / Q-Former / perceiver module that ``fastvlm.patch`` swaps in the built-in tiny
models (fastvlm.tiny_models; inputs captured from one forward of the model), a 12-layer BLIP-2-layout Q-Former at
tiny width, the hand-off (``scatter_image_features`` against transformers' count check + ``masked_scatter``) and
one fused GEMM launch. ``fastvlm bench --overhead [--families llava qwen2_vl] [--rounds 7] [--json out.jsonl]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

from fastvlm._table import markdown_table

ROUNDS = 7
TARGET_S = 0.02  # seconds of calls per round and provider


def _timer(fn, n, cpu=None):
    """Wall-clock µs per call; with a list ``cpu``, also appends this thread's CPU µs per call (``time.thread_time``:
    on a shared machine it leaves out the time other processes hold the core, which wall-clock rounds do not)."""
    c0 = time.thread_time()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    if cpu is not None:
        cpu.append((time.thread_time() - c0) / n * 1e6)
    return (t1 - t0) / n * 1e6


def interleaved(fns, rounds=ROUNDS, target_s=TARGET_S, cpu=None):
    """{name: (min µs, median µs)} over ``rounds`` rounds; each round times every fn in turn (same n per fn).
    With a dict ``cpu``, it receives the same for this thread's CPU time."""
    for fn in fns.values():  # warm up (first calls compile / fill caches)
        fn()
        fn()
    n = {}
    for name, fn in fns.items():
        t = _timer(fn, 3)
        n[name] = max(3, int(target_s * 1e6 / max(t, 1.0)))
    samples = {name: [] for name in fns}
    cpu_samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_timer(fn, n[name], cpu_samples[name]))
    if cpu is not None:
        cpu.update({name: (min(s), statistics.median(s)) for name, s in cpu_samples.items()})
    return {name: (min(s), statistics.median(s)) for name, s in samples.items()}


# ------------------------------------------------------------------------------------------------ cases


class Case:
    def __init__(self, name, original, fused, args=(), kwargs=None, note=""):
        self.name, self.original, self.fused, self.args, self.kwargs, self.note = name, original, fused, args, \
            kwargs or {}, note

    def call(self, which):
        mod = self.original if which == "eager" else self.fused
        args, kwargs = self.args, self.kwargs
        return lambda: mod(*args, **kwargs)


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def family_cases(family, device="cpu"):
    """A Case for every module of the tiny ``family`` model that fastvlm swaps, with the inputs of one forward."""
    import fastvlm
    from fastvlm.integrations.transformers import LINEAR_SLOTS
    from fastvlm.tiny_models import build_tiny_model

    model, inputs = build_tiny_model(family)
    found = {}
    for name, mod in model.named_modules():
        owner, _, attr = name.rpartition(".")
        owner_cls = type(model.get_submodule(owner)).__name__ if name else ""
        if fastvlm.nn.recipe_for(mod) is not None or (type(mod) is torch.nn.Linear and (owner_cls, attr) in LINEAR_SLOTS):
            found[name] = mod
    captured = {}
    handles = []
    for name, mod in found.items():
        def hook(m, args, kwargs, name=name):
            captured.setdefault(name, (args, kwargs))
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    cases = []
    for name, mod in found.items():
        if name not in captured:
            continue
        args, kwargs = captured[name]
        fused = fastvlm.nn.from_module(mod)
        cases.append(Case(f"{family}: {type(mod).__name__}", mod.to(device), fused.to(device), _move(args, device),
                          _move(kwargs, device)))
    return cases


def qformer_case(layers=12, device="cpu"):
    """A BLIP-2-layout Q-Former (cross-attention every 2nd layer) at tiny width: 4 queries x 16 image tokens."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    import fastvlm

    torch.manual_seed(0)
    cfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                             encoder_hidden_size=32, cross_attention_frequency=2)
    cfg._attn_implementation = "eager"
    m = Blip2QFormerModel(cfg).eval().to(device)
    q = torch.randn(1, 4, 32, device=device)
    enc = torch.randn(1, 16, 32, device=device)
    return Case(f"Q-Former {layers} layers (BLIP-2 layout)", m, fastvlm.nn.from_module(m), (),
                dict(query_embeds=q, encoder_hidden_states=enc))


class _HandoffEager(torch.nn.Module):
    """transformers' hand-off lines (LlavaModel.get_placeholder_mask + masked_scatter)."""

    def forward(self, embeds, input_ids, features, token_id):
        mask = (input_ids == token_id).unsqueeze(-1).expand_as(embeds)
        n_tokens = (input_ids == token_id).sum()
        if embeds[mask].numel() != features.numel():
            raise ValueError(f"Image features and image tokens do not match, tokens: {n_tokens}, features: "
                             f"{features.shape[0]}")
        return embeds.masked_scatter(mask, features.to(embeds.dtype))


class _HandoffFused(torch.nn.Module):
    def forward(self, embeds, input_ids, features, token_id):
        from fastvlm.ops.scatter import scatter_image_features

        return scatter_image_features(embeds, input_ids == token_id, features)


def handoff_case(device="cpu"):
    ids = torch.randint(10, 900, (1, 24), device=device)
    ids[0, 1:17] = 990
    embeds = torch.randn(1, 24, 64, device=device)
    feats = torch.randn(16, 64, device=device)
    return Case("hand-off: image rows into inputs_embeds", _HandoffEager(), _HandoffFused(),
                (embeds, ids, feats, 990))


class _GemmEager(torch.nn.Module):
    def forward(self, x, w, b):
        return torch.nn.functional.linear(x, w, b)


class _GemmFused(torch.nn.Module):
    def forward(self, x, w, b):
        from fastvlm.kernels.gemm import fused_linear

        return fused_linear(x, w, b)


class _GemmFusedMemo(torch.nn.Module):
    """fused_linear as an op calls it on a repeat call: its checks kept under the op's own key (``memo``)."""

    def __init__(self):
        super().__init__()
        self.memo = [None]

    def forward(self, x, w, b):
        from fastvlm.kernels.gemm import fused_linear

        return fused_linear(x, w, b, memo=self.memo)


def gemm_cases(device="cpu"):
    x, w, b = torch.randn(16, 32, device=device), torch.randn(64, 32, device=device), torch.randn(64, device=device)
    return [Case("one fused GEMM launch (kernels.gemm.fused_linear)", _GemmEager(), _GemmFused(), (x, w, b),
                 note="eager: F.linear"),
            Case("one fused GEMM launch, an op's repeat call (memo)", _GemmEager(), _GemmFusedMemo(), (x, w, b),
                 note="eager: F.linear")]


def all_cases(families=None, device="cpu", qformer_layers=12):
    from fastvlm.tiny_models import FAMILIES

    cases, seen = [], set()
    for fam in (families or FAMILIES) if families != ["none"] else ():
        try:
            fam_cases = family_cases(fam, device)
        except Exception as exc:  # a family whose tiny model cannot be built here: reported, not fatal
            print(f"  {fam}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        for c in fam_cases:
            cls = c.name.split(": ", 1)[1]
            if cls not in seen:  # one case per original class
                seen.add(cls)
                cases.append(c)
    if qformer_layers:
        cases.append(qformer_case(qformer_layers, device))
    cases.append(handoff_case(device))
    cases += gemm_cases(device)
    return cases


# ------------------------------------------------------------------------------------------------ running


def _count_launches(drv, fn):
    if drv is None:
        return None
    n = drv.launches
    fn()
    return drv.launches - n


def run(families=None, rounds=ROUNDS, json_path=None, verbose=True, qformer_layers=12):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    drv = None
    if device == "cpu":
        from fastvlm.bench import fake_driver

        drv = fake_driver.install()
        torch.set_num_threads(1)  # tiny ops: one thread, as a GPU host thread runs them
    warnings.filterwarnings("ignore", module="fastvlm")
    rows = []
    with torch.no_grad():
        for case in all_cases(families, device, qformer_layers):
            fns = {"eager": case.call("eager"), "fastvlm": case.call("fastvlm")}
            try:
                fns["fastvlm"]()  # compile
                launches = _count_launches(drv, fns["fastvlm"])
                cpu = {}
                res = interleaved(fns, rounds, cpu=cpu)
            except Exception as exc:
                print(f"  {case.name}: failed ({type(exc).__name__}: {exc})", file=sys.stderr)
                continue
            (e_min, e_med), (f_min, f_med) = res["eager"], res["fastvlm"]
            (ce_min, ce_med), (cf_min, cf_med) = cpu["eager"], cpu["fastvlm"]
            row = dict(case=case.name, device=device, eager_min_us=e_min, eager_median_us=e_med, fused_min_us=f_min,
                       fused_median_us=f_med, ratio_median=f_med / e_med, launches=launches, note=case.note,
                       eager_cpu_min_us=ce_min, eager_cpu_median_us=ce_med, fused_cpu_min_us=cf_min,
                       fused_cpu_median_us=cf_med, ratio_cpu_min=cf_min / ce_min)
            rows.append(row)
            if verbose:
                print(format_row(row), flush=True)
    if json_path:
        with open(json_path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


HEADER = (f"{'case':58} {'launch':>6} {'eager min':>9} {'median':>8} {'fused min':>9} {'median':>8} {'ratio':>6}"
          f" {'cpu: eager':>10} {'fused':>7} {'ratio':>6}")


def format_row(r):
    launches = "-" if r["launches"] is None else str(r["launches"])
    return (f"{r['case'][:58]:58} {launches:>6} {r['eager_min_us']:9.1f} {r['eager_median_us']:8.1f} "
            f"{r['fused_min_us']:9.1f} {r['fused_median_us']:8.1f} {r['ratio_median']:6.2f}"
            f" {r['eager_cpu_min_us']:10.1f} {r['fused_cpu_min_us']:7.1f} {r['ratio_cpu_min']:6.2f}")


def markdown(rows):
    head = ("module (tiny inputs)", "launches", "original eager µs (min / median)", "fastvlm µs (min / median)",
            "ratio", "thread CPU µs, min: original / fastvlm (ratio)")
    cells = [(r["case"], "-" if r["launches"] is None else r["launches"],
              f"{r['eager_min_us']:.0f} / {r['eager_median_us']:.0f}",
              f"{r['fused_min_us']:.0f} / {r['fused_median_us']:.0f}", f"{r['ratio_median']:.2f}",
              f"{r['eager_cpu_min_us']:.0f} / {r['fused_cpu_min_us']:.0f} ({r['ratio_cpu_min']:.2f}×)") for r in rows]
    return markdown_table(head, cells, right=range(1, 6))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fastvlm bench --overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overhead", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--families", nargs="*", help="tiny-model families (default: all; 'none': only the Q-Former, "
                                                  "hand-off and GEMM cases)")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--qformer-layers", type=int, default=12, help="0: no Q-Former case")
    ap.add_argument("--json", help="append result rows (JSON lines) to this file")
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = ap.parse_args(argv)
    print(HEADER)
    print("-" * len(HEADER))
    rows = run(args.families, args.rounds, args.json, qformer_layers=args.qformer_layers)
    if args.markdown:
        print()
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
