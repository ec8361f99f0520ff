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
    assert (out / "x").is_dir()  # entries the staging folder does not hold are left alone
    with pytest.raises(RuntimeError):
        with staged_output(str(out)) as stage:
            open(f"{stage}/model.safetensors", "w").write("half")
            raise RuntimeError("crash while writing")
    assert (out / "model.safetensors").read_text() == "new"  # the old complete output is untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]


def test_staged_output_beside_the_folder_moves_markers_last_and_clears_stale_stages(tmp_path,
                                                                                  monkeypatch):
    """The SD pipeline's variant: the staging folder is a sibling (the output folder already holds
    checkpoints and logs), a stale sibling from a killed save is removed, and the loadable marker
    is renamed last so no moment shows a config beside missing weights."""
    import hf_munba.utils.atomic_save as atomic_save

    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    stale = tmp_path / ".run.staging-old"
    (stale / "unet").mkdir(parents=True)
    order = []
    real = atomic_save.os.replace
    monkeypatch.setattr(atomic_save.os, "replace",
                        lambda a, b: (order.append(b.name), real(a, b)))
    with staged_output(out, beside=True) as stage:
        assert not stale.exists()
        assert stage.startswith(str(tmp_path / ".run.staging-"))
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # nothing published yet
        (tmp_path / stage).joinpath("unet").mkdir()
        open(f"{stage}/unet/w.safetensors", "w").write("w")
        open(f"{stage}/model_index.json", "w").write("{}")
        open(f"{stage}/README.md", "w").write("card")
    assert order == ["README.md", "unet", "model_index.json"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "checkpoint-2", "model_index.json",
                                                     "unet"]
    assert not list(tmp_path.glob(".run.staging-*"))
