"""A connector-only training step of a patched tiny LLaVA through the transformers Trainer (on accelerate) in 2
gloo processes on CPU.

The workers are started like torchrun starts them (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* set, a gloo process
group); the Trainer's accelerate state picks that group up (MULTI_CPU) and wraps the model in DDP. Vision tower and
language model are frozen, the projector is trained with one SGD step on a global batch of 2 (one sample per
process). Checked, for the patched and the unpatched model: the fused op ran in the patched one; the logged loss and
the projector's gradients (after DDP's all-reduce, taken by a TrainerCallback) and
the SGD step made from them against a float64 single-process reference within the
derived tolerance; every frozen parameter unchanged.
"""
import copy
import os

import pytest
import torch

import fastvlm
from dist_helpers import WORLD, check, spawn
from fastvlm.testing import tolerance

pytest.importorskip("accelerate", reason="the Trainer's distributed path needs accelerate (the test extra has it)")

LR = 0.1


def _samples(inputs):
    """Two samples shaped as a dataset yields them (no batch dimension), with language-model labels."""
    out = []
    for i in range(WORLD):
        torch.manual_seed(50 + i)
        s = {k: v[0] for k, v in inputs.items()}
        s["pixel_values"] = torch.randn_like(s["pixel_values"])
        s["labels"] = s["input_ids"].clone()
        out.append(s)
    return out


def _frozen_but_projector(model):
    for name, p in model.named_parameters():
        p.requires_grad_("multi_modal_projector" in name)
    return model


def _reference(model, samples):
    """Float64 loss per sample and the projector's gradient of their mean (what DDP averages)."""
    ref = copy.deepcopy(model).double()
    losses = []
    for s in samples:
        batch = {k: (v.double() if v.is_floating_point() else v)[None] for k, v in s.items()}
        losses.append(ref(**batch).loss)
    torch.stack(losses).mean().backward()
    return losses, {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}


def _train(model, samples, outdir):
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    args = TrainingArguments(output_dir=outdir, per_device_train_batch_size=1, max_steps=1, learning_rate=LR,
                             optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
                             dataloader_drop_last=True, remove_unused_columns=False, disable_tqdm=True)
    grads = {}

    class KeepGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):  # after DDP's all-reduce
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=default_data_collator,
                      callbacks=[KeepGradients()])
    with fastvlm.trace() as t:
        result = trainer.train()
    return result.training_loss, grads, t


def _trainer_worker(rank, outdir):
    from fastvlm.tiny_models import build_tiny_model

    os.environ["FASTVLM_BACKEND"] = "torch"
    failures = []
    base, inputs = build_tiny_model("llava", seed=0)
    base = _frozen_but_projector(base.train())
    samples = _samples(inputs)
    losses64, grads64 = _reference(base, samples)
    loss64 = torch.stack(losses64).mean()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    k = base.config.text_config.vocab_size  # the longest reduction on the loss's path (the LM head's softmax)
    for patched in (False, True):
        tag = "patched" if patched else "original"
        model = copy.deepcopy(base)
        if patched:
            report = fastvlm.patch(model)
            if "model.multi_modal_projector" not in [e.path for e in report.patched]:
                failures.append(f"{tag}: projector not patched:\n{report}")
        loss, grads, t = _train(model, samples, os.path.join(outdir, tag))
        ops = {r.op for r in t.records}
        if patched and "fastvlm::mlp_projector" not in ops:
            failures.append(f"{tag}: the fused op did not run:\n{t}")
        check(f"{tag} training loss", torch.tensor(loss), loss64, torch.float32, k, 8, failures)
        if set(grads) != set(grads64):
            failures.append(f"{tag}: gradients of {sorted(grads)}, expected {sorted(grads64)}")
        for name, p in model.named_parameters():
            if name in grads64:
                check(f"{tag} grad {name}", grads.get(name, torch.zeros(())), grads64[name], torch.float32, k, 8,
                      failures)
                if name in grads and not torch.equal(p.detach(), before[name].add(grads[name], alpha=-LR)):
                    failures.append(f"{tag}: {name} is not the SGD step from its gradient")
            elif not torch.equal(p.detach(), before[name]):
                failures.append(f"{tag}: frozen parameter {name} changed")
    assert grads64 and tolerance(torch.float32, k, 8) < 1e-4
    assert not failures, f"rank {rank}:\n" + "\n".join(failures)


def test_trainer_connector_only_step(tmp_path):
    spawn(_trainer_worker, str(tmp_path))
