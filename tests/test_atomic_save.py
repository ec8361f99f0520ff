"""Final outputs: non-empty folders refused without overwrite; staged publish never mixes old and new."""

import pytest

from hf_munba.utils.atomic_save import ensure_output_dir, staged_output


def test_ensure_output_dir(tmp_path):
    out = tmp_path / "out"
    ensure_output_dir(str(out), overwrite=False)
    assert out.is_dir()
    (out / "config.json").write_text("old")
    (out / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        ensure_output_dir(str(out), overwrite=False)
    ensure_output_dir(str(out), overwrite=False, allow_existing=True)  # resuming
    ensure_output_dir(str(out), overwrite=True, check_only=True)
    assert (out / "config.json").exists()
    ensure_output_dir(str(out), overwrite=True)
    assert not (out / "config.json").exists() and (out / "notes.txt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        ensure_output_dir(str(tmp_path / "file"), overwrite=True)


def test_staged_output_publishes_all_or_nothing(tmp_path):
    out = tmp_path / "out"
    with staged_output(str(out)) as stage:
        (tmp_path / "out" / "x").mkdir(exist_ok=True)
        open(f"{stage}/model.safetensors", "w").write("new")
        open(f"{stage}/config.json", "w").write("new")
    assert (out / "config.json").read_text() == "new" and (out / "model.safetensors").read_text() == "new"
    with pytest.raises(RuntimeError):
        with staged_output(str(out)) as stage:
            open(f"{stage}/model.safetensors", "w").write("half")
            raise RuntimeError("crash while writing")
    assert (out / "model.safetensors").read_text() == "new"  # the old complete output is untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
