"""vLLM offline generation with a random LLaVA, fastvlm's vLLM plugin on and off (issue 16, part 2; needs a CUDA
GPU and the environment .ci/vllm builds; not run on CPU).

    python benchmarks/vllm_generate.py --out DIR              # both runs, then the comparison: DIR/vllm_generate.json
    python benchmarks/vllm_generate.py --out DIR --size tiny  # a tiny connector (a quick smoke run)

The model is built here from config classes (nothing downloaded): a 1-layer CLIP vision tower, LLaVA-1.5-7B's
connector (1024 -> 4096 -> 4096 with ``--size llava7b``, the default) and a 2-layer Llama, random weights, with a
word-level tokenizer and a LlavaProcessor saved next to it. Each run is its own process (the plugin is installed when
vLLM loads its plugins, per process), with ``FASTVLM_VLLM=1`` or ``0``; vLLM runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that the connector's forward and the model's ``embed_multimodal`` (vLLM's
encoder step) can be timed around a CUDA synchronisation. Checks: identical greedy tokens for every prompt, and the
plugin's "fused" line in vLLM's log.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SIZES = {"llava7b": dict(vision=1024, text=4096, inter=11008, image=336),
         "tiny": dict(vision=64, text=128, inter=256, image=56)}
N_PROMPTS, MAX_TOKENS = 8, 16


def build_checkpoint(path, size):
    """A random LLaVA checkpoint, tokenizer and processor in ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    s = SIZES[size]
    words = ["<unk>", "<pad>", "<s>", "</s>", "<image>"] + [f"w{i}" for i in range(995)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    image_proc = CLIPImageProcessor(size={"shortest_edge": s["image"]},
                                    crop_size={"height": s["image"], "width": s["image"]})
    proc = LlavaProcessor(image_processor=image_proc, tokenizer=fast, patch_size=14,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=s["vision"], intermediate_size=4 * s["vision"],
                           num_hidden_layers=2, num_attention_heads=16 if s["vision"] >= 1024 else 4,
                           image_size=s["image"], patch_size=14, projection_dim=s["text"]),
        text_config=dict(model_type="llama", hidden_size=s["text"], intermediate_size=s["inter"], num_hidden_layers=2,
                         num_attention_heads=32 if s["text"] >= 4096 else 4, num_key_value_heads=8 if
                         s["text"] >= 4096 else 4, vocab_size=len(words), max_position_embeddings=2048,
                         pad_token_id=1, bos_token_id=2, eos_token_id=3),
        image_token_id=4, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    with torch.no_grad():  # a non-degenerate connector (HF initialises with a small std)
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path)
    proc.save_pretrained(path)


def _timed(cls, name, bucket):
    import torch

    inner = getattr(cls, name)

    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        torch.cuda.synchronize()
        bucket.append(time.perf_counter() - t0)
        return out

    setattr(cls, name, wrapper)


def one_run(path, out_json):
    """One vLLM run (in this process): greedy tokens and the connector's / encoder step's times."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # the plugin patches the connector first, then the timers wrap whichever forward is there
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration, LlavaMultiModalProjector

    times = {"connector": [], "encoder": []}
    _timed(LlavaMultiModalProjector, "forward", times["connector"])
    _timed(LlavaForConditionalGeneration, "embed_multimodal", times["encoder"])
    llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, max_model_len=1024, gpu_memory_utilization=0.4,
              limit_mm_per_prompt={"image": 1}, seed=0)
    for v in times.values():
        v.clear()  # the profile run's calls
    rng = np.random.default_rng(0)
    prompts = [{"prompt": f"<image> w{10 + i} w{20 + i} w{30 + i}",
                "multi_modal_data": {"image": Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8))}}
               for i in range(N_PROMPTS)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    result = dict(plugin=os.environ.get("FASTVLM_VLLM", "1"), tokens=[list(o.outputs[0].token_ids) for o in outs],
                  connector_s=times["connector"], encoder_s=times["encoder"])
    with open(out_json, "w") as f:
        json.dump(result, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="llava7b")
    ap.add_argument("--one-run", help=argparse.SUPPRESS)  # internal: checkpoint path of one run
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.one_run:
        return one_run(args.one_run, os.path.join(args.out, f"run_plugin{os.environ.get('FASTVLM_VLLM', '1')}.json"))
    ckpt = os.path.join(args.out, f"llava-{args.size}")
    t0 = time.perf_counter()
    build_checkpoint(ckpt, args.size)
    summary = dict(size=args.size, build_s=time.perf_counter() - t0)
    runs = {}
    for flag in ("1", "0"):
        env = dict(os.environ, FASTVLM_VLLM=flag, VLLM_LOGGING_LEVEL="INFO")
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--out", args.out, "--size", args.size, "--one-run", ckpt],
                           env=env, capture_output=True, text=True)
        log = p.stdout + p.stderr
        with open(os.path.join(args.out, f"run_plugin{flag}.log"), "w") as f:
            f.write(log)
        if p.returncode != 0:
            summary[f"plugin{flag}_error"] = log[-3000:]
            continue
        with open(os.path.join(args.out, f"run_plugin{flag}.json")) as f:
            runs[flag] = json.load(f)
        runs[flag]["wall_s"] = time.perf_counter() - t0
        runs[flag]["fused_lines"] = [line for line in log.splitlines() if "fastvlm:" in line]
    for flag, r in runs.items():
        c, e = r["connector_s"], r["encoder_s"]
        summary[f"plugin{flag}"] = dict(wall_s=r["wall_s"], connector_ms_total=1e3 * sum(c), connector_calls=len(c),
                                        encoder_ms_total=1e3 * sum(e), encoder_calls=len(e),
                                        fastvlm_log=r["fused_lines"])
    if len(runs) == 2:
        summary["identical_greedy_tokens"] = runs["1"]["tokens"] == runs["0"]["tokens"]
        summary["plugin_fused_line"] = any("fused" in line for line in runs["1"]["fused_lines"])
    with open(os.path.join(args.out, "vllm_generate.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    ok = summary.get("identical_greedy_tokens") and summary.get("plugin_fused_line")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
