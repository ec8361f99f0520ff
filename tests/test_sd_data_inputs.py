"""hf_munba.diffusion.data as a new user meets it: unlisted images refused, the dataset pickles (spawn
workers), one permutation per epoch, a ``datasets`` dataset decoded lazily, and the diffusers-style
crop / flip augmentation (seeded, exact under latent caching)."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import hf_munba.diffusion.data as sd_data
from hf_munba.diffusion.data import (DataValidationError, ImageCaptionSource, LatentCache,
                              PairedUnlearningDataset, dataset_source, load_imagefolder,
                              preprocess_image)
from hf_munba.testing import tiny_clip_tokenizer, tiny_vae

torch.set_num_threads(1)


def _source(name, n, size=(20, 16)):
    """Distinct images that change under any crop or flip (a gradient per image)."""
    w, h = size
    imgs = []
    for i in range(n):
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[..., 0] = np.arange(w)[None, :] * 10
        arr[..., 1] = np.arange(h)[:, None] * 10
        arr[..., 2] = i * 20 + (name == "forget") * 100
        imgs.append(Image.fromarray(arr))
    return ImageCaptionSource(name, imgs, [f"{name} {i}" for i in range(n)],
                              [f"{name}{i}" for i in range(n)])


def _dataset(n_f=3, n_r=5, **kw):
    return PairedUnlearningDataset(_source("forget", n_f), _source("retain", n_r),
                                   tiny_clip_tokenizer(), 16, anchor_prompt="anchor", **kw)


def _same_items(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ---- local folders ------------------------------------------------------------------------------
def test_an_image_the_metadata_does_not_list_is_an_error_naming_it(tmp_path):
    lines = []
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
        if i != 2:
            lines.append(json.dumps({"file_name": f"{i}.png", "text": f"t{i}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError) as e:
        load_imagefolder(tmp_path, role="forget")
    msg = str(e.value)
    assert "2.png" in msg and "0.png" not in msg and "not listed in metadata.jsonl" in msg
    assert "forget directory" in msg and "\n" not in msg
    # files that are not images (notes, an interrupted write's .tmp) are no concern
    (tmp_path / "2.png").rename(tmp_path / "notes.txt")
    (tmp_path / "x.png.tmp").write_bytes(b"partial")
    assert len(load_imagefolder(tmp_path)) == 3


# ---- the paired dataset -------------------------------------------------------------------------
def test_items_are_the_seeded_pairing_and_each_permutation_is_built_once(monkeypatch):
    ds = _dataset(n_f=3, n_r=7, seed=5)
    calls = []
    real = sd_data._perm

    def counting(n, *parts):
        calls.append((n, *parts))
        return real(n, *parts)

    monkeypatch.setattr(sd_data, "_perm", counting)
    for epoch in range(3):
        ds.set_pairing_epoch(epoch)
        items = [ds[i] for i in range(len(ds))]
        # the pairing the dataset always had: retain perm of (seed, epoch), forget cycles
        for i, it in enumerate(items):
            pos = epoch * 7 + i
            assert it["retain_index"] == int(real(7, 5, epoch, 0)[i])
            assert it["forget_index"] == int(real(3, 5, pos // 3, 1)[pos % 3])
    # one retain permutation per epoch and one per forget cycle, each built once (a cycle that
    # spans two epochs is kept), not one per item: 3 + 7 calls for 21 items
    cycles = sorted({pos // 3 for pos in range(21)})
    assert sorted(calls) == sorted([(7, 5, e, 0) for e in range(3)] + [(3, 5, c, 1) for c in cycles])


def test_dataset_pickles_and_feeds_spawned_workers():
    ds = _dataset(random_flip=True, center_crop=False, forget_prompts=["nudity", "naked"])
    ds.set_pairing_epoch(1)
    ds[0]  # fills its caches first
    again = pickle.loads(pickle.dumps(ds))
    assert again.epoch == 1
    for i in range(len(ds)):
        _same_items(ds[i], again[i])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1,
                                         multiprocessing_context="spawn")
    batches = list(loader)
    expected = [torch.utils.data.default_collate([ds[i] for i in range(s, min(s + 2, len(ds)))])
                for s in range(0, len(ds), 2)]
    assert len(batches) == len(expected)
    for b, e in zip(batches, expected):
        _same_items(b, e)


def test_datasets_dataset_is_decoded_lazily(monkeypatch):
    import datasets

    imgs = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": imgs, "text": [f"t{i}" for i in range(4)]}
                                    ).cast_column("image", datasets.Image())
    decoded = []
    real = datasets.Image.decode_example

    def counting(self, value, token_per_repo_id=None):
        decoded.append(1)
        return real(self, value, token_per_repo_id=token_per_repo_id)

    monkeypatch.setattr(datasets.Image, "decode_example", counting)
    src = dataset_source(ds, "image", "text", name="mem", role="forget")
    assert decoded == [] and len(src) == 4 and src.captions == ["t0", "t1", "t2", "t3"]
    assert len(set(src.hashes)) == 4
    img = src.load_image(2)
    assert len(decoded) == 1 and img.getpixel((0, 0)) == (80, 0, 0)
    # the hash is the one a local folder of the same files gives, so overlaps are found across
    # a folder and a dataset
    import io

    buf = io.BytesIO()
    imgs[1].save(buf, format="PNG")
    enc = ds.cast_column("image", datasets.Image(decode=False))[1]["image"]["bytes"]
    import hashlib

    assert src.hashes[1] == hashlib.sha1(enc).hexdigest()
    with pytest.raises(DataValidationError, match="no column 'caption'"):
        dataset_source(ds, "image", "caption", name="mem")


# ---- augmentation -------------------------------------------------------------------------------
def _gradient_image(w=24, h=16):
    """Every pixel different: red grows with x, green with y."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w)[None, :] * 10
    arr[..., 1] = np.arange(h)[:, None] * 10
    return Image.fromarray(arr)


def _red_columns(x):
    return [round(float(v)) for v in ((x[0, 0] + 1) * 127.5 / 10)]


def test_center_crop_random_crop_and_flip_positions():
    img = _gradient_image()  # 24x16 at resolution 16: 9 horizontal crop positions, no resize
    centre = preprocess_image(img, 16, center_crop=True)
    assert _red_columns(centre) == list(range(4, 20))
    lefts = set()
    for s in range(40):
        x = preprocess_image(img, 16, center_crop=False, generator=torch.Generator().manual_seed(s))
        cols = _red_columns(x)
        assert cols == list(range(cols[0], cols[0] + 16)) and 0 <= cols[0] <= 8
        lefts.add(cols[0])
    assert len(lefts) > 3 and {0, 8} & lefts  # really random, edges included
    flipped = preprocess_image(img, 16, center_crop=True, flip=True)
    assert _red_columns(flipped) == list(range(19, 3, -1))
    assert torch.equal(flipped, centre.flip(-1))


def test_dataset_augmentation_is_seeded_per_item_and_reproducible():
    base = _dataset(n_f=3, n_r=8, seed=1)
    rand = _dataset(n_f=3, n_r=8, seed=1, center_crop=False, random_flip=True)
    rand_again = _dataset(n_f=3, n_r=8, seed=1, center_crop=False, random_flip=True)
    flips, moved = [], 0
    for epoch in range(2):
        for d in (base, rand, rand_again):
            d.set_pairing_epoch(epoch)
        for i in range(8):
            a, b, c = base[i], rand[i], rand_again[i]
            _same_items(b, c)  # a pure function of (seed, epoch, item)
            assert a["retain_index"] == b["retain_index"] and a["forget_index"] == b["forget_index"]
            assert "retain_flipped" not in a
            flips.append(b["retain_flipped"])
            moved += not torch.equal(a["retain_pixel_values"], b["retain_pixel_values"])
    assert 0 < sum(flips) < len(flips) and moved > 0
    assert [rand[i]["retain_flipped"] for i in range(8)] != \
        [_dataset(n_f=3, n_r=8, seed=2, random_flip=True)[i]["retain_flipped"] for i in range(8)]


def test_latent_cache_is_exact_under_random_flip_and_refuses_random_crop():
    vae = tiny_vae()
    ds = _dataset(n_f=2, n_r=4, random_flip=True)
    ds.cache = LatentCache().build(ds, vae)
    assert {k[2] for k in ds.cache.latents} == {False, True}
    fresh = _dataset(n_f=2, n_r=4, random_flip=True)
    with torch.no_grad():
        for i in range(4):
            it, ref = ds[i], fresh[i]
            for role in ("retain", "forget"):
                assert it[f"{role}_flipped"] == ref[f"{role}_flipped"]
                mean = vae.encode(ref[f"{role}_pixel_values"][None]).latent_dist.mean[0]
                torch.testing.assert_close(it[f"{role}_latent_mean"], mean, rtol=1e-5, atol=1e-6)
    # a random crop cannot be cached ...
    with pytest.raises(ValueError, match="20x16, not square.*center_crop=True"):
        LatentCache().build(_dataset(center_crop=False), vae)
    # ... but a square image has one crop position: random == centre, so caching is exact
    square = PairedUnlearningDataset(_source("forget", 2, (24, 24)), _source("retain", 3, (24, 24)),
                                     tiny_clip_tokenizer(), 16, anchor_prompt="anchor",
                                     center_crop=False, random_flip=True)
    centred = PairedUnlearningDataset(_source("forget", 2, (24, 24)), _source("retain", 3, (24, 24)),
                                      tiny_clip_tokenizer(), 16, anchor_prompt="anchor",
                                      random_flip=True)
    for i in range(3):
        _same_items(square[i], centred[i])
    rng = torch.get_rng_state()
    square.cache = LatentCache().build(square, vae)
    assert len(square.cache.latents) == 2 * (2 + 3)
    # encoding draws no random numbers: training after it sees the same RNG stream as without it
    assert torch.equal(rng, torch.get_rng_state())


def _quadrants(w, h):
    """Four flat quadrants (distinct red/green levels) plus a gradient in blue: no two crop
    positions look alike and a flip is visible."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = (200, 40, 0)
    arr[: h // 2, w // 2:] = (40, 200, 0)
    arr[h // 2:, : w // 2] = (120, 120, 0)
    arr[h // 2:, w // 2:] = (0, 0, 0)
    arr[..., 2] = (np.arange(w)[None, :] * 255 // (w - 1) + np.arange(h)[:, None]) % 256
    return Image.fromarray(arr)


@pytest.mark.parametrize("size", [(48, 32), (32, 48)])  # wide and tall: both axes need a resize
def test_crop_position_after_a_resize_on_a_patterned_image(size):
    """The crop is taken from the bilinearly resized image: centred for center_crop, at a seeded
    uniform offset otherwise, and the flip mirrors exactly that crop."""
    img = _quadrants(*size)
    w, h = size
    s = 16 / min(w, h)
    full = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    ref = torch.from_numpy(np.asarray(full, dtype=np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)
    wide = w > h
    slack = (ref.shape[2] if wide else ref.shape[1]) - 16

    def window(offset):
        return ref[:, :, offset:offset + 16] if wide else ref[:, offset:offset + 16, :]

    def position(x):
        hits = [o for o in range(slack + 1) if torch.allclose(x, window(o), atol=1e-6)]
        assert len(hits) == 1, hits
        return hits[0]

    centre = preprocess_image(img, 16, center_crop=True)
    assert centre.shape == (3, 16, 16) and position(centre) == slack // 2
    seen = {position(preprocess_image(img, 16, center_crop=False,
                                      generator=torch.Generator().manual_seed(seed)))
            for seed in range(30)}
    assert len(seen) > 3 and seen & {0, slack}  # uniform over every position, edges included
    again = preprocess_image(img, 16, center_crop=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, preprocess_image(img, 16, center_crop=False,
                                               generator=torch.Generator().manual_seed(3)))
    flipped = preprocess_image(img, 16, center_crop=True, flip=True)
    assert torch.equal(flipped, centre.flip(-1)) and not torch.equal(flipped, centre)
