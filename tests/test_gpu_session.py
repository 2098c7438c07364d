"""benchmarks/gpu_session.sh cannot rot: its plan fits the lease on paper (budgets, documented table, files), and its
``--dry-run`` (tiny shapes, PyTorch path, the same steps and output files) runs here.

The default suite runs the plan check and a dry run of four steps (the install check, env, the GPU smoke subset in the
Triton interpreter, the training step with its gradient checks, then the packing into $OUT); the whole
dry run (every step, about 3.5 minutes of CPU time) is ``-m slow``: ``python -m pytest -m slow
tests/test_gpu_session.py``.
"""
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
LEASE_S = 510  # 8.5 minutes for every step, install included (the lease allows 10 per command, 15 in all)
STEPS = ["install", "env", "smoke", "projector", "patch-embed", "qformer", "perceiver", "projector-compile",
         "patch-compile", "qformer-compile", "train", "e2e", "ext", "overhead", "more-shapes", "gpu-tests"]


def _run(args, out, timeout, env=None):
    # generous step limits: a shared CI core can be slow, and the dry run checks the plumbing, not the timing
    e = dict(os.environ, OUT=str(out), SESSION_SCALE="20")
    e.update(env or {})
    e.pop("FASTVLM_BACKEND", None)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def test_plan_fits_the_lease(tmp_path):
    res = _run(["--list"], tmp_path / "out", 60, env={"SESSION_SCALE": "1"})
    assert res.returncode == 0, res.stderr
    plan = re.findall(r"^  (\S+)\s+(\d+|rest) s$", res.stdout, re.M)
    assert [name for name, _ in plan] == STEPS
    budgets = {name: b for name, b in plan}
    assert sum(int(b) for b in budgets.values() if b != "rest") <= LEASE_S
    assert f"deadline {LEASE_S} s" in res.stdout
    assert budgets["smoke"] != "rest" and int(budgets["smoke"]) <= 120  # the GPU test subset: two minutes at most
    assert list(budgets)[:3] == ["install", "env", "smoke"]  # correctness before any benchmark
    # the table at the top of the script documents the same budgets
    text = open(SCRIPT).read()
    documented = dict(re.findall(r"^#   ([a-z0-9-]+)\s+(\d+|rest)\s", text, re.M))
    assert {k: v for k, v in documented.items() if k in budgets} == budgets
    assert int(re.search(r"^#   sum of budgets\s+(\d+)", text, re.M).group(1)) == LEASE_S
    assert not (tmp_path / "out").exists()  # --list runs nothing


def _check_outputs(out, steps):
    files = sorted(os.listdir(out))
    assert files == ["env.json", "results.tar.gz", "summary.md"]  # <= 4 files come back from a lease
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] is True and env["commit"] and env["torch"] and env["measured_ceilings"]["copy_tbps"] > 0
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        assert top.startswith("dry-run-cpu_") and all(n.split("/")[0] == top for n in names)
        lines = tar.extractfile(f"{top}/steps.tsv").read().decode().splitlines()
        rcs = {line.split("\t")[0]: line.split("\t")[3] for line in lines}
        assert set(rcs) == set(steps), lines
        # every step ran to its end; `fastvlm bench --overhead` belongs to other work and is tolerated
        assert all(rc == "0" for s, rc in rcs.items() if s != "overhead"), lines
        rows = [json.loads(line) for line in tar.extractfile(f"{top}/projector.jsonl").read().decode().splitlines()]
    summary = (out / "summary.md").read_text()
    assert "**Dry run**" in summary and "| 2 | LLaVA-1.5 projector, B=8 (4608 tokens) vs eager |" in summary
    return rows, summary, names


@pytest.mark.slow  # .ci/run runs the whole dry run after the default suite
def test_dry_run_steps(tmp_path):
    """Four steps of the dry run: each ran to the end (exit 0); the GPU smoke subset passes in the interpreter (so it
    cannot rot between GPU sessions); rows carry the tiny flag, fwd+bwd rows checked every gradient, the summary
    evaluates the targets from them, and $OUT holds the three files."""
    out = tmp_path / "out"
    steps = ["install", "env", "smoke", "train"]
    res = _run(["--dry-run", "--only", ",".join(steps)], out, 900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows, summary, _ = _check_outputs(out, steps)
    assert re.search(r"- smoke: (\d+) tests, \1 passed, 0 failed", summary), summary
    train = [r for r in rows if r["mode"] == "fwd+bwd"]
    assert {(r["shape"], r["provider"]) for r in train} == {
        (s, p) for s in ("llava-1.5-7b@8", "gemma3-4b@64") for p in ("hf_eager", "fastvlm")}
    assert all(r["tiny"] and r["grad_rel_err"] is not None and r["grad_rel_err"] < 1e-5 for r in train)
    assert "| 2 | LLaVA-1.5 projector, B=8 fwd+bwd vs eager |" in summary and "dry run (no verdict)" in summary


@pytest.mark.slow
def test_full_dry_run(tmp_path):
    """Every step of the session on the CPU: all exit 0 (none cut by its limit), the smoke subset passes in the
    interpreter, every target's rows are there."""
    out = tmp_path / "out"
    res = _run(["--dry-run"], out, 1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _, summary, names = _check_outputs(out, STEPS)
    assert any(n.endswith("/smoke.junit.xml") for n in names)
    assert re.search(r"- smoke: (\d+) tests, \1 passed, 0 failed", summary), summary
    measured = re.findall(r"^\| \d+ \| .* \| dry run \(no verdict\) \|", summary, re.M)
    assert len(measured) >= 15, summary


def test_summary_judges_gpu_rows(tmp_path):
    """The summary's verdicts on GPU rows (which no CPU run produces): ratios across steps and files, the bf16-ceiling
    and bandwidth fractions from env.json's profile, failed tests and failed providers listed."""
    from fastvlm.bench import session

    dev = dict(device="NVIDIA H200", commit="abc1234", time="2026-01-01T00:00:00", dtype="torch.bfloat16")
    rows = [dict(dev, suite="projector", shape="llava-1.5-7b@8", mode="fwd", provider="hf_eager", ms=0.40,
                 rel_err=4e-3, flops=2 * 4608 * (1024 * 4096 + 4096 * 4096)),
            dict(dev, suite="projector", shape="llava-1.5-7b@8", mode="fwd", provider="fastvlm", ms=0.32,
                 rel_err=3e-3, flops=2 * 4608 * (1024 * 4096 + 4096 * 4096)),
            dict(dev, suite="projector", shape="gemma3-4b@64", mode="fwd", provider="hf_eager", ms=2.0, rel_err=1e-3,
                 min_bytes=604e6),
            dict(dev, suite="projector", shape="gemma3-4b@64", mode="fwd", provider="fastvlm", ms=1.25, rel_err=0.5,
                 min_bytes=604e6)]
    later = [dict(dev, suite="projector", shape="llava-1.5-7b@8", mode="fwd", provider="hf_compile_max_autotune",
                  ms=None, error="RuntimeError: boom")]
    (tmp_path / "projector.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + later) + '{"cut')
    (tmp_path / "env.json").write_text(json.dumps(dict(device="NVIDIA H200", roofline_profile=dict(
        name="H200", bf16_tflops=790.0, tf32_tflops=395.0, fp32_tflops=54.0, copy_tbps=4.3, source="test"))))
    (tmp_path / "steps.tsv").write_text("smoke\t100\t64\t0\t300\nprojector\t45\t45\t124\t40\n")
    (tmp_path / "smoke.junit.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_gpu_smoke" name="test_a"/>'
        '<testcase classname="tests.test_gpu_smoke" name="test_b"><failure message="relative error 1.2e-01 &gt; '
        'bound"/></testcase></testsuite></testsuites>')
    text = session.summary(str(tmp_path))
    assert "| 2 | LLaVA-1.5 projector, B=8 (4608 tokens) vs eager | 1.25x | >= 1.15x | met |" in text
    assert "| 2 | LLaVA-1.5 projector, B=8 vs torch.compile max-autotune | — | >= 1x | not measured |" in text
    assert "hf_compile_max_autotune: RuntimeError: boom" in text
    tflops = 2 * 4608 * (1024 * 4096 + 4096 * 4096) / 0.32e-3 / 790e12
    assert f"| 2 | LLaVA-1.5 projector, B=8: fraction of the bf16 ceiling | {100 * tflops:.0f}% | >= 65% |" in text
    assert "| 5 | Gemma 3 projector, B=64 vs eager | 1.60x | >= 2x | NOT met |" in text
    assert f"| {100 * 604e6 / 1.25e-3 / 4.3e12:.0f}% | >= 70% | NOT met |" in text
    assert "| projector | 45 | 45 | 40 | 124 (time limit) |" in text
    assert "- smoke: 2 tests, 1 passed, 1 failed" in text and "test_b: relative error 1.2e-01 > bound" in text
    assert "gemma3-4b@64 fwd fastvlm torch.bfloat16: rel_err 5.00e-01" in text  # an accuracy flag


def test_dry_run_fails_when_a_step_fails(tmp_path):
    """A failing step no longer ends in exit 0: every selected step still runs, then the dry run exits 1 naming the
    failed steps. Cheap: a PYTHON that fails the install check (``-m pip``) and the env step, and passes the rest to
    the real interpreter (the packing into $OUT still runs)."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n'
                    'case " $* " in *" -m pip "*) exit 3 ;; *" fastvlm.bench.session env "*) exit 4 ;; esac\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    res = _run(["--dry-run", "--only", "install,env"], out, 300, env={"PYTHON": str(fake)})
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 step(s) failed: install (exit 3),env (exit 4)" in res.stderr
    with tarfile.open(out / "results.tar.gz") as tar:
        (tsv,) = [m for m in tar.getmembers() if m.name.endswith("/steps.tsv")]
        rows = [line.split("\t") for line in tar.extractfile(tsv).read().decode().splitlines()]
    assert [(r[0], r[3]) for r in rows] == [("install", "3"), ("env", "4")]  # the second step ran after the first
    ok = _run(["--dry-run", "--only", "install"], tmp_path / "ok", 300)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
