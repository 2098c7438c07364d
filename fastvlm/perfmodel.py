"""A performance model of fastvlm's fused paths at the canonical shapes (an estimate, not a measurement).

For every op and canonical shape it derives, from the kernel designs as they are today (tile sizes, grids, extra
passes), with or without a GPU:

* FLOPs (2·M·N·K per GEMM, the attention cores' QKᵀ and PV);
* minimal bytes: inputs, weights and outputs each read or written once, intermediates kept on chip
  (../shared/research/performance.md §1 uses the same definition);
* the bytes the design moves to and from HBM: the minimal bytes plus every extra pass (norm statistics read the
  input once more, an MLP's hidden activations round-trip between its two GEMMs, a separate row-norm pass, per-call
  table copies); re-reads of a tile are assumed to hit L2;
* the bytes the design moves from L2 into the SMs: every CTA reads its whole A panel and W panel, so A is read once
  per N tile and W once per M tile (a pooled A-load reads all Q source rows of each pooled row);
* CTAs, waves and SM fill (the mean fraction of SMs busy over the waves) of each GEMM;
* the bound this implies on each device: max(FLOPs / (peak · fill), HBM bytes / bandwidth), beside the roofline
  bound max(FLOPs / peak, minimal bytes / bandwidth). L2 bandwidth is not a term (we have no measured ceiling for
  it); instead ``l2_x`` compares the op's L2 -> SM bytes with those of plain GEMMs of the same shapes, which exposes
  a pooled A-load that re-reads its raw input once per N tile (Gemma 3: 16x); where l2_x is large the time is
  underestimated.

Ceilings come from fastvlm/bench/devices.py (the benchmarks' profiles): ≈790 TFLOP/s dense bf16 on H100 and H200
(measured; the same SMs and clocks), device copies at ≈3.0 TB/s (H100) and ≈4.3 TB/s (H200), TF32 at half the bf16
ceiling (derived); fp32 dots computed as tf32x3 are taken at a third of TF32. Both have 132 SMs. Dense bf16/fp16
GEMMs (a strided A, no gated pair) run on the TMA core (kernels/gemm_tma.py) on sm_90: the model takes the tile and
persistent schedule its launcher picks (kernels/gemm_tma_schedule.py: whole waves data-parallel, a thin last wave
split over K; the fp32 partial tiles count as L2 -> SM bytes). For the other GEMMs (the pointer core) the model
assumes the first autotune config (128×128×64 tiles; 128×64 for gated pairs and for fp32, whose BLOCK_K 32 rows start
there; linear_norm's split variant 64×32) because it cannot know the autotuner's pick, and it runs every GEMM at the
ceiling times its SM fill: the GEMM core's own efficiency (pipelining, TMA, tile shape) is not a term,
so the model's time is a bound the design could reach, not a prediction; GPU measurements are owed.

    python -m fastvlm.perfmodel [--device H100|H200] [--json]
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field

from fastvlm import _table


@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    bf16_tflops: float  # dense, measured ceiling
    tf32_tflops: float
    hbm_tbps: float  # device-to-device copy, measured ceiling

    def peak(self, dtype):
        return {"bf16": self.bf16_tflops, "fp16": self.bf16_tflops, "tf32": self.tf32_tflops,
                "fp32": self.tf32_tflops / 3}[dtype] * 1e12  # fp32 = tf32x3: three TF32 dots


def _devices():
    from fastvlm.bench.devices import PROFILES  # the ceilings the benchmarks score against, in one place

    return {key: Device(c.name, 132, c.bf16_tflops, c.tf32_tflops, c.copy_tbps) for key, c in PROFILES.items()}


DEVICES = _devices()

# targets of issue 12 checked by the model
BYTES_RATIO_MAX = 1.3
FILL_MIN_B8 = 0.85
FILL_MIN_LLAVA_B1 = 0.70


@dataclass
class Gemm:
    """One launch of a GEMM-shaped kernel: out[M, N] = A[M, K] @ W[N, K]^T (+ epilogue)."""
    name: str
    M: int
    N: int
    K: int
    q: int = 1  # source rows read per A element (pooling window); 1 for strided and gather loads
    gated: bool = False  # two weights, two accumulators (SwiGLU pair)
    tile: tuple = (128, 128)
    elem: int = 2
    count: int = 1  # identical launches (layers)
    core: str = "pointer"  # "tma": the Hopper core (kernels/gemm_tma.py) the dense bf16/fp16 path takes on sm_90
    norm: bool = False  # a norm prologue (restricts the TMA core's tiles)

    def __post_init__(self):
        if self.core == "tma":  # the tile the launcher's schedule picks on 132 SMs
            self.tile = tuple(self.schedule(132)[0][:2])

    def schedule(self, sms):
        """The TMA core's (config, (programs, dp_tiles, split, k_tiles_per_split, tiles, cost))."""
        from fastvlm.kernels import gemm_tma_schedule as S

        return S.choose(self.M, self.N, self.K, "layernorm" if self.norm else "none", sms, self.elem)

    @property
    def flops(self):
        return 2 * self.M * self.N * self.K * (2 if self.gated else 1) * self.count

    @property
    def ctas(self):
        return math.ceil(self.M / self.tile[0]) * math.ceil(self.N / self.tile[1])

    def fill(self, sms):
        """Mean share of the SMs busy. The pointer core: one CTA per tile, whole waves. The TMA core: whole waves
        data-parallel, then the last wave's tiles split over K (each range 1/split of a tile's time)."""
        if self.core == "tma":
            cfg, (_, dp, split, kps, tiles, _) = self.schedule(sms)
            k_tiles = math.ceil(self.K / cfg[2])
            time = dp // sms + math.ceil((tiles - dp) * split / sms) * kps / k_tiles if split > 1 \
                else math.ceil(tiles / sms)
            return tiles / (sms * time)
        waves = math.ceil(self.ctas / sms)
        return self.ctas / (waves * sms)

    @property
    def split_partials(self):
        """Bytes the TMA core's split tail writes and reads back as fp32 partial tiles (L2-resident)."""
        if self.core != "tma":
            return 0
        _, (_, dp, split, _, tiles, _) = self.schedule(132)
        return 2 * (tiles - dp) * split * self.tile[0] * self.tile[1] * 4 * self.count if split > 1 else 0

    @property
    def a_bytes(self):  # distinct input bytes the A-load touches
        return self.M * self.K * self.q * self.elem

    @property
    def w_bytes(self):
        return self.N * self.K * self.elem * (2 if self.gated else 1)

    @property
    def l2_to_sm(self):
        tiles_m, tiles_n = math.ceil(self.M / self.tile[0]), math.ceil(self.N / self.tile[1])
        return (tiles_n * self.a_bytes + tiles_m * self.w_bytes) * self.count + self.split_partials

    @property
    def l2_to_sm_plain(self):  # the same GEMM with a plain (q = 1) A operand
        tiles_m, tiles_n = math.ceil(self.M / self.tile[0]), math.ceil(self.N / self.tile[1])
        return (tiles_n * self.a_bytes // self.q + tiles_m * self.w_bytes) * self.count + self.split_partials


@dataclass
class OpModel:
    op: str
    shape: str
    gemms: list
    min_bytes: float  # inputs + weights + outputs once
    extra: dict = field(default_factory=dict)  # extra HBM passes of the design: name -> bytes
    attn_flops: float = 0.0
    dtype: str = "bf16"
    fill_target: float = 0.0  # 0: no SM-fill target at this shape

    @property
    def flops(self):
        return sum(g.flops for g in self.gemms) + self.attn_flops

    @property
    def design_bytes(self):
        return self.min_bytes + sum(self.extra.values())

    @property
    def l2_to_sm(self):
        return sum(g.l2_to_sm for g in self.gemms)

    def fill(self, dev):
        """FLOP-weighted SM fill over the op's GEMMs: the fraction of the SMs' time the GEMMs keep busy."""
        return sum(g.flops for g in self.gemms) / sum(g.flops / g.fill(dev.sms) for g in self.gemms)

    def main_gemm(self):
        return max(self.gemms, key=lambda g: g.flops)

    def row(self, dev: Device):
        peak = dev.peak(self.dtype)
        bound = max(self.flops / peak, self.min_bytes / (dev.hbm_tbps * 1e12))
        compute = sum(g.flops / (peak * g.fill(dev.sms)) for g in self.gemms) + self.attn_flops / peak
        model = max(compute, self.design_bytes / (dev.hbm_tbps * 1e12))
        g = self.main_gemm()
        fill = self.fill(dev)
        ratio = self.design_bytes / self.min_bytes
        return {
            "op": self.op, "shape": self.shape, "dtype": self.dtype, "device": dev.name,
            "gflop": self.flops / 1e9, "min_mb": self.min_bytes / 1e6, "design_mb": self.design_bytes / 1e6,
            "bytes_ratio": ratio, "l2_to_sm_gb": self.l2_to_sm / 1e9,
            "l2_x": self.l2_to_sm / sum(g.l2_to_sm_plain for g in self.gemms),
            "main_gemm": f"{g.name} {g.M}x{g.N}x{g.K}", "ctas": g.ctas, "waves": g.ctas / dev.sms, "fill": fill,
            "roofline_us": bound * 1e6, "model_us": model * 1e6, "model_vs_roofline": bound / model,
            "bytes_ok": ratio <= BYTES_RATIO_MAX, "fill_ok": fill >= self.fill_target,
            "extra_passes": {k: v / 1e6 for k, v in self.extra.items()},
        }


# ------------------------------------------------------------------------------------------------ canonical shapes
def llava(B, E=2):
    """(a) LLaVA-1.5-7B projector 1024 -> 4096 GELU -> 4096, bias; two GEMM launches, h round-trips HBM."""
    M, D, H = 576 * B, 1024, 4096
    gemms = [Gemm("fc1+gelu", M, H, D, core="tma"), Gemm("fc2", M, H, H, core="tma")]
    min_b = (M * D + H * D + H * H + M * H) * E + 2 * H * E
    return OpModel("llava_projector", f"LLaVA-1.5-7B B={B}", gemms, min_b, {"h write+read": 2 * M * H * E},
                   fill_target=FILL_MIN_LLAVA_B1 if B == 1 else FILL_MIN_B8)


def gemma3(B, E=2, N=2560):
    """(f) Gemma 3 projector: 4096x1152 per image, 4x4 mean pool, RMSNorm(1+w) of the pooled row, matmul 1152 -> N.
    Past one N tile the op pools first (ops/projector.py ``_pool_first``): one pass reads the input and writes the
    pooled rows, the statistics pass and the GEMM read those (1/16 of the input)."""
    T, D, P = 4096, 1152, 256
    M = P * B
    x = B * T * D * E
    pooled = M * D * E
    min_b = x + D * N * E + M * N * E + D * E
    from fastvlm.ops.projector import POOL_FIRST_MIN_N

    if N >= POOL_FIRST_MIN_N:
        gemms = [Gemm("norm+matmul on pooled rows", M, N, D, core="tma", norm=True)]
        extra = {"pooled rows write": pooled, "norm stats read": pooled, "GEMM A read": pooled}
    else:  # the pooled A-load inside the GEMM, statistics from a pass over the input
        gemms = [Gemm("pool+norm+matmul", M, N, D, q=16)]
        extra = {"norm stats pass": x}
    return OpModel("gemma3_projector", f"Gemma 3-4B B={B}", gemms, min_b, extra,
                   fill_target=FILL_MIN_B8 if B >= 8 else 0.0)


def clip_patch(B, E=2):
    """(b) CLIP-L/14 at 336 px: im2col GEMM (K = 588) + bias + positions, class token, pre-LayerNorm as a separate
    row-norm pass over the output, position rows repeated per call."""
    T, K, D = 576, 3 * 14 * 14, 1024
    M = T * B
    gemms = [Gemm("im2col gemm", M, D, K)]
    out = B * (T + 1) * D * E
    min_b = B * 3 * 336 * 336 * E + D * K * E + (T + 1) * D * E + D * E + out + 2 * D * E
    extra = {"row-norm pass (read+write)": 2 * out, "pos_rows.repeat (int64 write+read)": 2 * M * 8,
             "class-token write": B * D * E}
    return OpModel("clip_patch_embed", f"CLIP-L/14-336 B={B}", gemms, min_b, extra,
                   fill_target=FILL_MIN_B8 if B >= 8 else 0.0)


def qwen2vl_merger(patches, E=2):
    """(d) Qwen2-VL-7B merger: LayerNorm(1280) per patch (statistics pass), free 2x2 merge, 5120 -> 5120 GELU -> 3584."""
    M, D, H, O = patches // 4, 5120, 5120, 3584
    gemms = [Gemm("norm+fc1+gelu", M, H, D, core="tma", norm=True), Gemm("fc2", M, O, H, core="tma")]
    x = patches * 1280 * E
    min_b = x + (H * D + O * H) * E + M * O * E + (2 * 1280 + H + O) * E
    extra = {"norm stats pass": x, "h write+read": 2 * M * H * E}
    return OpModel("qwen2vl_merger", f"Qwen2-VL-7B {patches} patches", gemms, min_b, extra, fill_target=FILL_MIN_B8)


# fp32 GEMM tiles (kernels/gemm_configs.py FP32_GEMM_CONFIGS[0]: BLOCK_K 32 rows, the audited tf32x3 tiles) and
# linear_norm's (kernels/linear_norm.py): 64-row tiles; the split-N variant's first config is 64x32, the single pass
# owns whole rows. The variant rule is linear_norm's own (``single_pass_fill`` < SINGLE_PASS_MIN_FILL -> split).
FP32_TILE = (128, 64)
LN_BLOCK_M, LN_SPLIT_BLOCK_N, LN_FIN_N = 64, 32, 256
LN_SINGLE_PASS_MIN_FILL = 0.85


def linear_norm_split(M, sms):
    """Whether linear_norm runs its split-N variant at M rows on ``sms`` SMs (kernels/linear_norm.py's rule)."""
    tiles = math.ceil(M / LN_BLOCK_M)
    return tiles / (math.ceil(tiles / sms) * sms) < LN_SINGLE_PASS_MIN_FILL


def linear_norm_workspace_bytes(M, N):
    """HBM bytes of the split variant's row statistics: [2, T, M] fp32 written once, read by each of the
    normalising launch's cdiv(N, 256) column programs of a row block (the pre-norm h round trip, through ``out``,
    is the single pass's too and stays in L2 at these sizes)."""
    ws = 2 * math.ceil(N / LN_SPLIT_BLOCK_N) * M * 4
    return ws * (1 + math.ceil(N / LN_FIN_N))


def qformer(B, E=4, layers=12, cross_every=2, sms=132):
    """(c') BLIP-2 Q-Former query path in fp32 (tf32x3 dots): 32 queries x 768, image 257 x 1408, 12 heads. The
    image-side K/V of all cross-attention layers in one GEMM (fp32 tiles 128x64); dense + residual + LayerNorm in
    linear_norm: below 85% SM fill of its cdiv(M, 64) whole-row programs (every B < 264) the split-N variant, a
    [cdiv(M, 64) x cdiv(768, 32)] grid plus a normalising launch, else the single pass (64 x 768 tiles)."""
    Mq, Mi, D, Di, F = 32 * B, 257 * B, 768, 1408, 3072
    n_cross = layers // cross_every
    split = linear_norm_split(Mq, sms)
    ln_tile = (LN_BLOCK_M, LN_SPLIT_BLOCK_N if split else D)
    ln = lambda name, k, count: Gemm(name, Mq, D, k, tile=ln_tile, elem=E, count=count)  # noqa: E731
    g = lambda name, m, n, k, count=1: Gemm(name, m, n, k, tile=FP32_TILE, elem=E, count=count)  # noqa: E731
    gemms = [g("self qkv", Mq, 3 * D, D, layers), ln("self dense+res+LN", D, layers),
             g("cross q", Mq, D, D, n_cross), g("cross kv (all layers)", Mi, 2 * D * n_cross, Di),
             ln("cross dense+res+LN", D, n_cross), g("ffn fc1+gelu", Mq, F, D, layers),
             ln("ffn fc2+res+LN", F, layers)]
    attn = 4 * B * 12 * 32 * 64 * (32 * layers + 257 * n_cross)
    weights = (layers * (4 * D * D + 2 * D * F) + n_cross * (2 * D * D + 2 * D * Di)) * E
    min_b = weights + (Mi * Di + 2 * Mq * D) * E
    extra = {"per-layer activations write+read": 2 * layers * Mq * (3 * D + 2 * D + F) * E,
             "image K/V write+read": 2 * Mi * 2 * D * n_cross * E}
    if split:
        extra["linear_norm split: row statistics"] = (2 * layers + n_cross) * linear_norm_workspace_bytes(Mq, D)
    return OpModel("qformer", f"BLIP-2 Q-Former B={B}", gemms, min_b, extra, attn_flops=attn, dtype="fp32",
                   fill_target=FILL_MIN_B8 if B >= 8 else 0.0)


def perceiver(B, N=729, E=2, depth=3):
    """(e) Idefics2 perceiver: hidden 4096, 64 latents, q 16x96, kv 4x96 over [context; latents], gated MLP
    4096 -> 16384 -> 4096 on the latents; RMSNorm statistics passes over context and latents."""
    L, D, F = 64 * B, 4096, 16384
    Mkv = (N + 64) * B
    gemms = [Gemm("q", L, 16 * 96, D, count=depth, core="tma", norm=True),
             Gemm("kv", Mkv, 2 * 4 * 96, D, count=depth, core="tma", norm=True),
             Gemm("o+res", L, D, 16 * 96, count=depth, core="tma"),
             Gemm("gate/up pair", L, F, D, gated=True, tile=(128, 64), count=depth),  # gated: the pointer core
             Gemm("down+res", L, D, F, count=depth, core="tma")]
    attn = 4 * B * 16 * 64 * 96 * (N + 64) * depth
    weights = depth * (D * 16 * 96 * 2 + D * 2 * 4 * 96 + 3 * D * F) * E
    ctx = B * N * D * E
    min_b = weights + ctx + 2 * L * D * E
    extra = {"context norm stats passes": depth * ctx,
             "per-layer latent activations write+read": 2 * depth * L * (2 * 16 * 96 + D + F) * E,
             "kv write+read": 2 * depth * Mkv * 2 * 4 * 96 * E}
    return OpModel("idefics2_perceiver", f"Idefics2 perceiver N={N} B={B}", gemms, min_b, extra, attn_flops=attn,
                   fill_target=FILL_MIN_B8 if B >= 8 else 0.0)


def canonical():
    """Every canonical shape of issue 12's targets."""
    return [gemma3(64), clip_patch(8), clip_patch(64), qwen2vl_merger(16384), llava(1), llava(8), llava(64),
            qformer(8), perceiver(8)]


def table(device="H100"):
    dev = DEVICES[device]
    return [m.row(dev) for m in canonical()]


def format_table(rows):
    head = (f"{'shape':32} {'GFLOP':>8} {'min MB':>8} {'design MB':>9} {'ratio':>6} {'L2->SM GB':>9} {'l2_x':>5} {'CTAs':>5} "
            f"{'waves':>6} {'fill':>5} {'roofline us':>11} {'model us':>9} {'of roof':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['shape']:32} {r['gflop']:8.1f} {r['min_mb']:8.1f} {r['design_mb']:9.1f} "
                     f"{r['bytes_ratio']:5.2f}{'' if r['bytes_ok'] else '!'} {r['l2_to_sm_gb']:9.2f} {r['l2_x']:5.1f} "
                     f"{r['ctas']:5d} {r['waves']:6.2f} {r['fill']:4.0%}{'' if r['fill_ok'] else '!'} "
                     f"{r['roofline_us']:11.1f} {r['model_us']:9.1f} {r['model_vs_roofline']:7.0%}")
    lines.append(f"(a model, not a measurement; '!' marks a miss of issue 12's targets: bytes <= {BYTES_RATIO_MAX}x "
                 f"minimal, SM fill >= {FILL_MIN_B8:.0%} at B >= 8, >= {FILL_MIN_LLAVA_B1:.0%} at LLaVA B=1; "
                 f"fill = FLOP-weighted over the op's GEMMs; CTAs and waves: the largest GEMM's)")
    return "\n".join(lines)


def markdown_table(rows):
    """The rows as a Markdown table (the README's performance section)."""
    head = ("shape", "GFLOP", "min MB", "design MB (x min)", "L2->SM x", "fill", "roofline µs", "model µs")
    cells = [(r["shape"], f"{r['gflop']:.1f}", f"{r['min_mb']:.1f}",
              f"{r['design_mb']:.1f} ({r['bytes_ratio']:.2f}{'' if r['bytes_ok'] else ' !'})", f"{r['l2_x']:.1f}",
              f"{r['fill']:.0%}{'' if r['fill_ok'] else ' !'}", f"{r['roofline_us']:.1f}", f"{r['model_us']:.1f}")
             for r in rows]
    return _table.markdown_table(head, cells, right=range(1, 8))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastvlm.perfmodel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=sorted(DEVICES), nargs="*", default=["H100", "H200"])
    ap.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    args = ap.parse_args(argv)
    for name in args.device:
        rows = table(name)
        if args.json:
            for r in rows:
                print(json.dumps(r))
        elif args.markdown:
            print(f"\n{DEVICES[name].name}\n")
            print(markdown_table(rows))
        else:
            print(f"\nperformance model on {DEVICES[name].name} ({asdict(DEVICES[name])})")
            print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
