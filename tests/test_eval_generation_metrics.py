"""Generative metrics on planted inputs (exact numbers) and on real tiny/bundled models."""

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hf_munba.evaluation import nudity

from eval_generation_helpers import one_torch_thread  # noqa: F401
from hf_munba.evaluation.clip_score import (clip_scores, clip_scores_from_embeddings, load_clip,
                                            summarize_clip_scores)
from hf_munba.evaluation.fid import (FIDUnavailableError, extract_features, frechet_distance,
                                     fid_from_features, images_to_unit_float,
                                     load_feature_extractor)
from hf_munba.evaluation.image_classification import (intended_class_accuracy, load_classifier,
                                                      predict, resolve_label)
from hf_munba.evaluation.grid import image_grid
from hf_munba.evaluation.report import CARD_BEGIN, CARD_END, generation_markdown, update_model_card
from hf_munba.evaluation.results import write_results


def det(label, score):
    return {"class": label, "score": score, "box": [1, 2, 3, 4]}


# ---------------------------------------------------------------- NudeNet
@pytest.fixture(scope="module")
def sample_photos(tmp_path_factory):
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, arr in enumerate(load_sample_images().images):
        paths.append(folder / f"photo{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def test_nudenet_detector_really_runs_on_benign_photos(sample_photos, tmp_path):
    detector = nudity.NudityDetector()
    # the bundled ONNX network itself: 4 box coordinates + 18 class scores per anchor
    onnx = detector._detector.onnx_session
    out = onnx.run(None, {onnx.get_inputs()[0].name: np.zeros((1, 3, 320, 320), np.float32)})
    assert out[0].shape[:2] == (1, 22)
    dets = detector.detect(sample_photos, batch_size=2)
    assert len(dets) == 2 and all(isinstance(d, list) for d in dets)
    labels = set(nudity.EXPOSED_CLASSES[i][1] for i in range(8))
    manifest = [{"file_name": p.name, "text": "a photo", "seed": i}
                for i, p in enumerate(sample_photos)]
    rows = nudity.detect_folder(detector, "photos", sample_photos[0].parent, manifest,
                                tmp_path / "n.csv")
    table = nudity.nudity_table(rows)["photos"]
    # a Chinese temple and a flower: no exposed body part at the paper's threshold
    assert table["images"] == 2 and table["total_exposed"] == 0 and table["images_with_any"] == 0
    assert all(d["class"] not in labels or d["score"] < 0.6 for ds in dets for d in ds)
    with pytest.raises(FileNotFoundError):
        detector.detect([tmp_path / "missing.png"])


def test_counts_respect_threshold_and_class_mapping():
    dets = [det("FEMALE_BREAST_EXPOSED", 0.9), det("FEMALE_BREAST_EXPOSED", 0.61),
            det("FEMALE_BREAST_COVERED", 0.99), det("FACE_FEMALE", 0.95),
            det("BELLY_EXPOSED", 0.59), det("MALE_GENITALIA_EXPOSED", 0.6),
            det("ANUS_EXPOSED", 0.9)]
    counts = nudity.count_exposed(dets, 0.6)
    assert counts == {"male_genitalia": 1, "belly": 0, "armpits": 0, "feet": 0,
                      "male_breast": 0, "female_genitalia": 0, "female_breast": 2, "buttocks": 0}
    assert list(counts) == ["male_genitalia", "belly", "armpits", "feet", "male_breast",
                            "female_genitalia", "female_breast", "buttocks"]
    assert nudity.count_exposed(dets, 0.5)["belly"] == 1
    assert nudity.count_exposed(dets, 0.95)["female_breast"] == 0
    with pytest.raises(ValueError, match="threshold"):
        nudity.count_exposed(dets, 0.0)


def test_labels_match_installed_nudenet():
    import importlib

    labels = getattr(importlib.import_module("nudenet.nudenet"), "__labels")
    assert all(label in labels for _, label in nudity.EXPOSED_CLASSES)


class PlantedDetector:
    """Returns fixed detections per file name and records which files it was asked about."""

    def __init__(self, by_name):
        self.by_name, self.calls = by_name, []

    def detect(self, paths, batch_size=8):
        names = [p.name for p in paths]
        self.calls.append(names)
        return [self.by_name[n] for n in names]


def test_csv_rows_are_appended_and_resumed(tmp_path):
    planted = {"a.png": [det("BUTTOCKS_EXPOSED", 0.8), det("FEET_EXPOSED", 0.7)],
               "b.png": [det("BUTTOCKS_EXPOSED", 0.65), det("BUTTOCKS_EXPOSED", 0.9)],
               "c.png": [det("ARMPITS_EXPOSED", 0.3)]}
    manifest = [{"file_name": n, "text": "naked", "seed": i} for i, n in enumerate(planted)]
    csv_path = tmp_path / "per_image.csv"
    d = PlantedDetector(planted)
    rows_m1 = nudity.detect_folder(d, "sd", tmp_path, manifest[:2], csv_path)
    rows_m1 = nudity.detect_folder(d, "sd", tmp_path, manifest, csv_path)  # resume: only c.png
    rows_m2 = nudity.detect_folder(d, "munba", tmp_path, manifest, csv_path)
    assert d.calls == [["a.png", "b.png"], ["c.png"], ["a.png", "b.png", "c.png"]]
    with open(csv_path, newline="") as f:
        raw = list(csv.DictReader(f))
    assert len(raw) == 6  # one row per (model, image), none overwritten
    assert [(r["model"], r["file_name"]) for r in raw] == [
        ("sd", "a.png"), ("sd", "b.png"), ("sd", "c.png"),
        ("munba", "a.png"), ("munba", "b.png"), ("munba", "c.png")]
    assert all(r["threshold"] == "0.6" for r in raw)
    assert raw[1]["buttocks"] == "2" and raw[2]["any_exposed"] == "0"
    assert json.loads(raw[2]["detections"])[0]["class"] == "ARMPITS_EXPOSED"
    # another threshold gets its own rows, appended
    rows_low = nudity.detect_folder(d, "sd", tmp_path, manifest, csv_path, threshold=0.2)
    assert len(nudity.read_rows(csv_path)) == 9 and rows_low[2]["armpits"] == 1

    table = nudity.nudity_table(rows_m1 + rows_m2, 0.6)
    assert list(table) == ["sd", "munba"]
    sd = table["sd"]
    assert (sd["buttocks"], sd["feet"], sd["armpits"], sd["belly"]) == (2, 1, 0, 0)
    assert sd["total_exposed"] == 3 and sd["images_with_any"] == 2 and sd["images"] == 3
    assert sd["threshold"] == 0.6
    with pytest.raises(ValueError, match="other thresholds"):
        nudity.nudity_table(rows_low, 0.6, ["sd"])


def test_append_refuses_a_foreign_csv(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a hf_munba NudeNet"):
        nudity.append_rows(tmp_path / "x.csv", [])


# ---------------------------------------------------------------- classification
IMAGENET_LIKE = {0: "tench, Tinca tinca", 1: "English springer, English springer spaniel",
                 2: "church, church building", 3: "chain saw, chainsaw"}


def test_resolve_label():
    assert resolve_label("tench", IMAGENET_LIKE) == 0
    assert resolve_label("English springer", IMAGENET_LIKE) == 1
    assert resolve_label("Chain_Saw", IMAGENET_LIKE) == 3
    assert resolve_label("2", IMAGENET_LIKE) == 2
    with pytest.raises(ValueError, match="not one of"):
        resolve_label("parachute", IMAGENET_LIKE)
    with pytest.raises(ValueError, match="several"):
        resolve_label("a", {0: "a, x", 1: "a, y"})


def test_intended_class_accuracy_planted():
    intended = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    predicted = [0, 1, 1, 1, 1, 1, 2, 2, 2, 0]
    res = intended_class_accuracy(predicted, intended, forget_classes=[0], id2label=IMAGENET_LIKE)
    assert res["forget_accuracy"] == pytest.approx(25.0)
    assert res["retain_accuracy"] == pytest.approx(100 * 5 / 6)
    assert res["per_class"] == {"tench, Tinca tinca": 25.0,
                                "English springer, English springer spaniel": 100.0,
                                "church, church building": 75.0}
    assert (res["forget_images"], res["retain_images"]) == (4, 6)
    assert intended_class_accuracy([1], [1], [])["forget_accuracy"] is None
    with pytest.raises(ValueError, match="predictions"):
        intended_class_accuracy([1, 2], [1], [])


def test_classifier_from_directory_runs(tmp_path, sample_photos):
    from transformers import ViTImageProcessor

    from hf_munba.testing import tiny_vit_classifier

    model = tiny_vit_classifier(num_labels=3, image_size=16, num_channels=3,
                                label_names=["tench", "church", "golf ball"])
    model.save_pretrained(tmp_path / "clf")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "clf")
    m, p = load_classifier(str(tmp_path / "clf"))
    preds = predict(m, p, sample_photos, batch_size=1)
    x = p(images=[Image.open(f).convert("RGB") for f in sample_photos], return_tensors="pt")
    with torch.no_grad():
        assert preds == m(**x).logits.argmax(-1).tolist()


# ---------------------------------------------------------------- CLIP score
def test_clip_score_planted_embeddings():
    img = torch.tensor([[1.0, 0.0], [3.0, 3.0], [1.0, 0.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    s = clip_scores_from_embeddings(img, txt)
    assert s.tolist() == pytest.approx([100.0, 100 / np.sqrt(2), 0.0])
    summ = summarize_clip_scores(s.tolist())
    assert summ["clip_score"] == pytest.approx((100 + 100 / np.sqrt(2)) / 3)
    assert summ["images"] == 3


def test_clip_score_with_a_clip_directory(tmp_path, sample_photos):
    from hf_munba.testing import tiny_clip_model, tiny_clip_processor

    tiny_clip_model().save_pretrained(tmp_path / "clip")
    tiny_clip_processor().save_pretrained(tmp_path / "clip")
    model, proc = load_clip(str(tmp_path / "clip"))
    prompts = ["a temple", "a flower " * 40]  # the second is truncated, not an error
    scores = clip_scores(model, proc, sample_photos, prompts, batch_size=1)
    x = proc(text=prompts, images=[Image.open(f).convert("RGB") for f in sample_photos],
             return_tensors="pt", padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        out = model(**x)
    cos = (out.image_embeds * out.text_embeds).sum(-1)
    assert scores == pytest.approx((100 * cos.clamp(min=0)).tolist(), abs=1e-4)


# ---------------------------------------------------------------- FID
def _closed_form(mu1, s1, mu2, s2):
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), by eigendecomposition."""
    def psd_sqrt(a):
        w, v = np.linalg.eigh(a)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    r1 = psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1)))


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)  # non-commuting
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form(mu1, s1, mu2, s2),
                                                               rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    # diagonal case: sum (sqrt(a) - sqrt(b))^2 + |dmu|^2
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert frechet_distance(np.zeros(3), np.diag(d1), np.ones(3), np.diag(d2)) == pytest.approx(
        3 + 1 + 1)


def test_fid_of_planted_gaussian_features():
    rng = np.random.default_rng(1)
    n, mu2 = 20000, np.array([1.0, -2.0, 0.5, 0.0])
    std1, std2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    fa = rng.normal(size=(n, 4)) * std1
    fb = mu2 + rng.normal(size=(n, 4)) * std2
    expected = np.sum(mu2 ** 2) + np.sum((std1 - std2) ** 2)
    assert fid_from_features(fa, fb) == pytest.approx(expected, rel=0.03)
    with pytest.raises(ValueError, match="N >= 2"):
        fid_from_features(fa[:1], fb)


def test_fid_inputs_are_unit_floats_not_uint8_roundtrips():
    white, grey = Image.new("RGB", (4, 4), (255, 255, 255)), Image.new("RGB", (4, 4), (1, 2, 3))
    x = images_to_unit_float([white, grey])
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4)
    assert x[0].min() == 1.0 and x[1, :, 0, 0].tolist() == pytest.approx([1 / 255, 2 / 255, 3 / 255])


def test_fid_extractor_errors_are_clear(tmp_path):
    with pytest.raises(FIDUnavailableError, match="pt_inception"):
        load_feature_extractor(f"pytorch-fid:{tmp_path / 'pt_inception.pth'}")
    with pytest.raises(FIDUnavailableError, match="not found"):
        load_feature_extractor(f"hf:{tmp_path / 'nothing'}")


def test_fid_with_a_transformers_extractor(tmp_path, sample_photos):
    from hf_munba.testing import tiny_clip_model, tiny_clip_processor

    tiny_clip_model().save_pretrained(tmp_path / "clip")
    tiny_clip_processor().save_pretrained(tmp_path / "clip")
    extractor = load_feature_extractor(f"hf:{tmp_path / 'clip'}")
    photos = [Image.open(p).convert("RGB") for p in sample_photos]
    files = []
    for i, im in enumerate(photos * 2):
        files.append(tmp_path / f"{i}.png")
        im.rotate(90 * i).save(files[-1])
    feats = extract_features(extractor, files, batch_size=3)
    assert feats.shape == (4, 32)
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-4)
    assert fid_from_features(feats[:2], feats[2:]) > 0


# ---------------------------------------------------------------- report
def _results():
    row = lambda n: dict({c: n for c, _ in nudity.EXPOSED_CLASSES}, total_exposed=8 * n,
                         images_with_any=n, images=10, threshold=0.6)
    return {"prompt_set": "nudity", "num_images": 10,
            "models": {"sd": {"model_dir": "x", "lora_dir": None},
                       "munba": {"model_dir": "x", "lora_dir": "y"}},
            "generation": {"guidance_scale": 7.5, "num_inference_steps": 50},
            "metrics": {"nudity": {"threshold": 0.6, "table": {"sd": row(3), "munba": row(0)}},
                        "clip": {"clip_model": "clip", "table": {
                            "sd": {"clip_score": 31.234, "clip_score_std": 1.0, "images": 10},
                            "munba": {"clip_score": 30.5, "clip_score_std": 2.0, "images": 10}}},
                        "classification": {"classifier": "clf", "forget_classes": ["tench"],
                                           "table": {m: {"forget_accuracy": a, "retain_accuracy": 90.0,
                                                         "per_class": {"tench": a, "church": 90.0}}
                                                     for m, a in (("sd", 95.0), ("munba", 0.0))}},
                        "fid": {"reference_dir": "coco", "feature_extractor": "pt", "table": {
                            m: {"fid": f, "images": 10, "reference_images": 20}
                            for m, f in (("sd", 14.07), ("munba", 15.12))}}}}


def test_markdown_and_json_tables(tmp_path):
    res = _results()
    paths = write_results(tmp_path, res, markdown=generation_markdown)
    assert json.loads(open(paths["json"]).read()) == res
    md = open(paths["markdown"]).read()
    assert "threshold 0.6" in md
    assert ("| model | male genitalia | belly | armpits | feet | male breast | female genitalia "
            "| female breast | buttocks | total | images with any | images |") in md
    assert "| sd | 3 | 3 | 3 | 3 | 3 | 3 | 3 | 3 | 24 | 3 | 10 |" in md
    assert "| munba | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 10 |" in md
    assert "| sd | 31.23 | 1.00 | 10 |" in md
    assert "| munba | 0.00 | 90.00 | 0.00 | 90.00 |" in md
    assert "| munba | 15.12 | 10 | 20 |" in md
    assert md == generation_markdown(res) and not list(tmp_path.glob(".*.tmp"))


def test_image_grid(tmp_path):
    files = []
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (16, 16), color).save(files[-1])
    image_grid({"sd": files[:2], "munba": files[2:]}, tmp_path / "grid.png", cell=32,
               label_width=40)
    g = np.asarray(Image.open(tmp_path / "grid.png"))
    assert g.shape == (64, 40 + 2 * 32, 3)
    assert g[10, 50].tolist() == [255, 0, 0] and g[10, 90].tolist() == [0, 255, 0]
    assert g[40, 50].tolist() == [0, 0, 255] and g[40, 90].tolist() == [255, 255, 255]


def test_model_card_section_is_inserted_then_replaced(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: mit\n---\n# My model\n\nTrained with MUNBa.\n")
    update_model_card(tmp_path, "## Eval\n| a |\n|---|\n| 1 |")
    update_model_card(tmp_path, "## Eval\n| a |\n|---|\n| 2 |")
    text = card.read_text()
    assert text.startswith("---\nlicense: mit\n---\n# My model\n\nTrained with MUNBa.\n")
    assert text.count(CARD_BEGIN) == 1 and text.count(CARD_END) == 1
    assert "| 2 |" in text and "| 1 |" not in text
    fresh = tmp_path / "new"
    fresh.mkdir()
    update_model_card(fresh, "## Eval")
    assert (fresh / "README.md").read_text().startswith("# new\n")
    with pytest.raises(FileNotFoundError):
        update_model_card(tmp_path / "missing", "x")


FAKE_PYTORCH_FID = '''
import torch

BLOCK = {}


def load_state_dict_from_url(url, progress=True):
    raise RuntimeError("tried to download " + url)


def fid_inception_v3():
    layer = torch.nn.Linear(3, 2, bias=False)
    layer.load_state_dict(load_state_dict_from_url("https://example/pt_inception.pth"))
    return layer


class InceptionV3(torch.nn.Module):
    """Same constructor and output contract as pytorch_fid.inception.InceptionV3."""
    BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}
    seen = []

    def __init__(self, output_blocks=(3,), resize_input=True, normalize_input=True,
                 requires_grad=False, use_fid_inception=True):
        super().__init__()
        assert list(output_blocks) == [3] and resize_input and normalize_input
        self.net = fid_inception_v3()

    def forward(self, x):
        InceptionV3.seen.append(x.clone())
        pooled = (2 * x - 1).mean(dim=(2, 3))
        return [self.net(pooled)[:, :, None, None]]
'''


def test_pytorch_fid_extractor_uses_local_weights_and_unit_inputs(tmp_path, monkeypatch, request):
    """pytorch-fid (needs torchvision) is not installed here: a stand-in module with its API
    checks that the weights come from the given file, never a download, and inputs are [0, 1]."""
    pkg = tmp_path / "fake" / "pytorch_fid"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "inception.py").write_text(FAKE_PYTORCH_FID)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    request.addfinalizer(lambda: [sys.modules.pop(k) for k in list(sys.modules)
                                  if k.split(".")[0] == "pytorch_fid"])
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"weight": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])}, weights)
    extractor = load_feature_extractor(str(weights))
    feats = extractor([Image.new("RGB", (5, 5), (255, 0, 51))]).detach()
    from pytorch_fid.inception import InceptionV3

    x = InceptionV3.seen[-1]
    assert x.dtype == torch.float32 and float(x.max()) == 1.0 and float(x.min()) == 0.0
    assert feats.shape == (1, 2)
    assert feats[0].tolist() == pytest.approx([1.0, 2 * (2 * 51 / 255 - 1)])
