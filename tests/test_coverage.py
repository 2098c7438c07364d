"""``fastvlm coverage`` (issue 15, deliverable 4): every family of the installed image-text-to-text mapping is fused
or listed with the reason it is not."""
import pytest

from fastvlm import coverage
from fastvlm.coverage_notes import NOTES


@pytest.fixture(scope="module")
def rows():
    return coverage.report()


def test_every_family_is_fused_or_listed_with_a_reason(rows):
    """Fails for a model type of the installed mapping that fastvlm neither fuses nor lists with a reason."""
    assert {r.model_type for r in rows} == set(coverage.mapping())
    unlisted = [r.model_type for r in rows if r.status == "unlisted"]
    assert not unlisted, f"fused by nothing and not in fastvlm/coverage_notes.py: {unlisted}"
    for r in rows:
        assert r.status in coverage.STATUSES
        if r.status in ("fused", "partly fused"):
            assert r.fused, r
        if r.status != "fused":
            assert r.not_fused.strip(" |;"), r  # a reason, not an empty string
    accounted = sum(r.status != "unlisted" for r in rows)
    assert accounted >= 0.9 * len(rows)


def test_notes_are_well_formed_and_not_stale(rows):
    import re

    by_class = {r.model_type: " ".join(f for f in r.fused if "(recipe" in f or "a copy of" in f) for r in rows}
    for mt, (kind, text) in NOTES.items():
        assert kind in ("structure", "partly", "unsupported", "nothing", "unavailable"), mt
        assert text.strip(" |"), mt
        if kind == "partly":
            assert " | " in text and text.partition(" | ")[2].strip(), mt
        if kind in ("structure", "partly"):  # a class the note names as fused by structure is no recipe or copy
            for name in re.findall(r"\b([A-Z]\w+) \(", text.partition(" | ")[0]):
                assert name not in by_class.get(mt, ""), (mt, name)


def test_families_the_readme_lists_are_fused(rows):
    by_type = {r.model_type: r for r in rows}
    for mt in ("llava", "llava_next", "llava_next_video", "llava_onevision", "video_llava", "vipllava", "paligemma",
               "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "idefics2", "idefics3", "smolvlm",
               "llama4", "gemma3", "mistral3", "aya_vision", "cohere2_vision", "lfm2_vl", "blip-2", "instructblip",
               "fast_vlm"):
        if mt in by_type:
            assert by_type[mt].status == "fused", by_type[mt]


def test_static_finds_recipes_and_copies():
    row = coverage.static("qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration")
    assert "Qwen2_5OmniPatchMerger (structure: a copy of PatchMerger)" in row.fused and row.status == "fused"
    row = coverage.static("llava", "LlavaForConditionalGeneration")
    assert {"LlavaMultiModalProjector (recipe)", "CLIPVisionEmbeddings (recipe)"} <= set(row.fused)


def test_build_recognises_modules_as_patch_does():
    from fastvlm.coverage_build import built

    row = built("video_llama_3", "VideoLlama3ForConditionalGeneration")
    assert row.fused == ["model.projector: VideoLlama3Projector (structure: Linear-GELU-Linear)"], row
    row = built("glm4v", "Glm4vForConditionalGeneration")
    assert row.status == "partly fused" and "post_layernorm" in row.not_fused, row
    assert {"model.visual.merger: Glm4vVisionPatchMerger (recipe)",
            "model.visual.downsample: Conv2d (merge conv: kernel == stride == spatial_merge_size)"} <= set(row.fused)
    assert any("patch_embed" in f for f in row.fused), row


def test_readme_table_is_what_coverage_gives(rows):
    """The README's family table is ``fastvlm coverage``'s for the transformers version its marker records."""
    import pathlib

    import transformers

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    version, block = coverage.readme_table(text)
    assert block is not None, "README.md has no generated coverage table between its markers"
    if version != transformers.__version__:
        pytest.skip(f"README's table is for transformers {version}, {transformers.__version__} is installed")
    assert block == coverage.readme_block(rows, version), (
        "README.md's family table differs from `fastvlm coverage`: run `fastvlm coverage --update-readme README.md`")


def test_update_readme_rewrites_only_between_the_markers(tmp_path):
    row = coverage.static("llava", "LlavaForConditionalGeneration")
    path = tmp_path / "README.md"
    path.write_text("intro\n<!-- coverage:begin transformers=1.0 (old) -->\nstale\n<!-- coverage:end -->\nrest\n")
    assert coverage.update_readme(path, [row], "9.9")
    text = path.read_text()
    assert text.startswith("intro\n<!-- coverage:begin transformers=9.9 ") and text.endswith("-->\nrest\n")
    assert "stale" not in text and "| llava | fused |" in text
    assert coverage.readme_table(text)[0] == "9.9"
    assert not coverage.update_readme(path, [row], "9.9")  # already current
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        coverage.update_readme(path, [row], "9.9")


def test_cli(capsys):
    from fastvlm.cli import main

    assert main(["coverage", "llava", "chameleon", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| llava | fused |" in out and "| chameleon | nothing to fuse |" in out


@pytest.mark.slow
def test_build_mode_agrees_with_the_notes():
    """Every family built on the meta device: what recognition by structure actually swaps, against the notes."""
    for r in coverage.report(build=True):
        assert r.status != "unlisted", r
        kind = NOTES.get(r.model_type, (None, ""))[0]
        if kind == "structure":
            assert any("(structure" in f for f in r.fused), r
