"""The fastvlm command: info reports backends with reasons, check passes on the built-in models, bench runs on CPU."""
import pytest

from fastvlm import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "device", "triton kernels", "CUDA extension", "FusedLlavaMultiModalProjector"):
        assert word in out


def test_check_small(capsys, torch_backend):
    assert cli.main(["check", "--small"]) == 0
    out = capsys.readouterr().out
    assert "all fused modules match" in out and "FusedQwen2VLPatchMerger" in out


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


def test_unknown_command():
    assert cli.main(["nope"]) == 2
