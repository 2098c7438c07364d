"""The fastvlm command: info reports backends with reasons, check passes on the built-in models, bench runs on CPU."""
import sys

import pytest

import fastvlm.check
from fastvlm import cli
from fastvlm.tiny_models import FAMILIES, canonical_family


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "device", "triton kernels", "CUDA extension", "FusedLlavaMultiModalProjector"):
        assert word in out


def test_check_full(capsys, torch_backend):
    """The README's main command, `fastvlm check`: every module case at tiny and real sizes, then the tiny LLaVA."""
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "all fused modules match" in out and "tiny llava model, patched vs original" in out
    rows = [line.split() for line in out.splitlines() if line.endswith(" yes") or line.endswith(" NO")]
    assert len(rows) == len(fastvlm.check.cases()) and all(r[-1] == "yes" for r in rows)
    assert {r[0] for r in rows} <= set(FAMILIES)  # one naming scheme: the families of `fastvlm check FAMILY`
    real = {" ".join(r[1:3]): r[3] for r in rows if r[2].startswith("(") and r[2][1].isupper()}
    assert real == {"LlavaMultiModalProjector (LLaVA-1.5-7B)": "1x576x1024", "PatchMerger (Qwen2-VL-7B)": "1024x1280"}


def _render(text):
    """What a terminal shows for ``text`` (\r returns to the line start, later characters overwrite earlier ones;
    no other control sequence is expected)."""
    assert "\x1b" not in text.replace("\x1b[A", "")  # tqdm moves up only for nested bars
    lines = []
    for raw in text.split("\n"):
        line = []
        for part in raw.split("\r"):
            line[:len(part)] = part
        lines.append("".join(line).rstrip())
    return lines


def test_check_small_progress_bar_is_cleared_on_a_terminal(capsys, torch_backend, monkeypatch):
    """On a terminal the progress bar (stderr) is cleared before each row (stdout): the screen shows clean rows."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    assert fastvlm.check.check_modules(small=True)
    text = screen.getvalue()
    assert "fastvlm check" in text.split("\n", 2)[2]  # the bar was drawn after the header
    shown = [line for line in _render(text) if line]
    rows = [line for line in shown if line.endswith(" yes")]
    assert len(rows) == len(fastvlm.check.cases(small=True))
    assert all(line.split()[0] in set(FAMILIES) | {"fastvlm", "family", "all"} or set(line) == {"-"}
               for line in shown), shown
    assert shown[-1] == "all fused modules match their originals"


def test_check_family_names_and_aliases():
    from fastvlm.testing import FAMILIES as CASES
    from fastvlm.testing import case_family

    assert {case_family(c) for c in CASES} <= set(FAMILIES)
    assert canonical_family("blip_2") == canonical_family("blip-2") == canonical_family("BLIP2") == "blip2"
    assert canonical_family("llava-next") == "llava_next" and canonical_family("llama4:adapter") == "llama4"
    assert canonical_family("llama4_adapter") is None and canonical_family("blip_3") is None


def test_check_help_lists_the_families(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(f in out for f in FAMILIES) and "blip_2 = blip2" in out


def test_check_unknown_family_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "blip_3"])
    assert exc.value.code == 2
    assert "'blip_3' is neither a directory nor a built-in family" in capsys.readouterr().err


def test_bench_cpu_path_says_so(capsys, torch_backend, tmp_path):
    pytest.importorskip("transformers")
    out_file = tmp_path / "rows.jsonl"
    assert cli.main(["bench", "--shapes", "qwen2-vl-7b@1024", "--reps", "1", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "not a measurement of fastvlm's kernels" in out
    import json

    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"hf_eager", "fastvlm"}
    assert all(r["rel_err"] < 1e-5 and r["commit"] and r["device"] for r in rows)


def test_check_family_and_model_dir(capsys, torch_backend, tmp_path):
    from fastvlm.tiny_models import build_tiny_model

    assert cli.main(["check", "qwen2_vl"]) == 0
    assert "greedy tokens identical" in capsys.readouterr().out
    model, _ = build_tiny_model("llava")
    model.save_pretrained(tmp_path)
    assert cli.main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FusedLlavaMultiModalProjector" in out and "fastvlm" in out and "ms on probe" in out


def test_e2e_bench_smoke(torch_backend, capsys):
    from fastvlm.bench import e2e

    rows = e2e.run(models=["qwen2-vl-7b"], paths=["connector"], reps=1, tiny=True)
    assert {r["provider"] for r in rows} == {"hf_eager", "fastvlm"}
    assert all(r["rel_err"] < 1e-5 for r in rows)


def test_unknown_command(capsys):
    assert cli.main(["nope"]) == 2
    assert "fastvlm: unknown command 'nope' (choose from info, check, audit, bench, model, coverage)" in capsys.readouterr().err


_WITHOUT_HF = """
import contextlib, io, json, sys

class Missing:  # transformers and timm are not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Missing())
from fastvlm import cli

results = {}
for argv in (["info"], ["check"], ["check", "llava"], ["check", "blip_2"], ["bench"], ["bench", "qformer"]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except BaseException as exc:  # escaped: the console script would print a traceback
            rc = f"raised {type(exc).__name__}: {exc}"
    results[" ".join(argv)] = (rc, out.getvalue(), err.getvalue())
print(json.dumps(results))
"""


def test_without_transformers_commands_say_what_to_install():
    """Without transformers: check / bench end in one line naming the extra to install, exit 1, no traceback;
    info says transformers is missing."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _WITHOUT_HF], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    for argv, (rc, out, err) in results.items():
        if argv == "info":
            continue
        assert rc == 1, (argv, rc, out, err)
        assert out == "" and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, out, err)
        assert err.startswith(f"fastvlm {argv.split()[0]}: needs transformers, which is not installed"), err
        assert 'pip install "fastvlm[hf]"' in err
    rc, out, err = results["info"]
    assert rc == 0 and "transformers  not installed" in out
    drop_in = next(line for line in out.splitlines() if line.startswith("drop-in modules"))
    assert "FusedLinear only" in drop_in and "transformers" in drop_in and ": ," not in drop_in
