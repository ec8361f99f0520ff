"""Fréchet Inception Distance, standard formula, correctly scaled inputs, local weights only.

FID(a, b) = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) over feature statistics. The
formula and its numerical care (an ``eps`` diagonal offset when the product is singular, dropping
a negligible imaginary part of the matrix square root) follow pytorch-fid, the implementation
published numbers come from.

Scaling trap seen in public code: images normalised to [-1, 1] and then cast to uint8. Here every
image is read from disk as 8-bit RGB, converted to float in [0, 1] and handed to the extractor,
which applies its own normalisation (pytorch-fid's InceptionV3 maps [0, 1] to [-1, 1] and resizes
to 299 bilinearly; a transformers model gets the PIL image and its own image processor).

Feature extractors (``load_feature_extractor(spec)``):

* ``pytorch-fid:/path/pt_inception-2015-12-05-6726825d.pth`` (or any path ending in ``.pth``):
  pytorch-fid's FID Inception (2048-d pool3) with those weights. Needs ``pip install
  pytorch-fid`` (which needs torchvision); nothing is downloaded. Only this gives numbers
  comparable with published FID.
* ``hf:/path/model_dir`` (or any directory): a transformers vision model's pooled features
  (``get_image_features`` for CLIP). Useful to compare models with each other, not with papers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch

from ._images import batched, load_rgb

__all__ = ["frechet_distance", "feature_statistics", "images_to_unit_float",
           "load_feature_extractor", "parse_extractor_spec", "extract_features", "fid_from_features",
           "summarize_fid", "FIDUnavailableError"]


class FIDUnavailableError(RuntimeError):
    """The requested FID feature extractor cannot be built from what is available locally."""


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need a (N >= 2, D) feature matrix, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two feature statistics have different dimensions")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the matrix "
                             "square root: covariance estimates are degenerate")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def images_to_unit_float(images: Sequence) -> torch.Tensor:
    """8-bit RGB PIL images -> float32 (N, 3, H, W) in [0, 1] (no uint8 round trip)."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError("images differ in size; resize them to one size first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


def _pytorch_fid_extractor(weights: str, device: str) -> Callable:
    if not Path(weights).is_file():
        raise FIDUnavailableError(
            f"FID Inception weights {weights} not found. Download "
            "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID_WEIGHTS_URL) on a machine "
            "with internet access and pass its path.")
    try:
        from pytorch_fid import inception as fid_inception
    except ImportError as e:
        raise FIDUnavailableError("FID with Inception weights needs pytorch-fid (and torchvision): "
                                  "pip install pytorch-fid") from e
    from unittest import mock

    def local_weights(*_args, **_kwargs):  # instead of a download
        return torch.load(weights, map_location="cpu", weights_only=True)

    with mock.patch.object(fid_inception, "load_state_dict_from_url", local_weights):
        block = fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
        model = fid_inception.InceptionV3([block], resize_input=True, normalize_input=True,
                                          use_fid_inception=True).to(device).eval()

    def extract(images):
        x = images_to_unit_float(images).to(device)
        return model(x)[0].squeeze(-1).squeeze(-1)

    return extract


def _transformers_extractor(path: str, device: str) -> Callable:
    if not Path(path).is_dir():
        raise FIDUnavailableError(f"FID feature extractor directory {path} not found")
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()

    def extract(images):
        inputs = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(device)
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(pixel_values=pixel_values)
        else:
            out = model(pixel_values=pixel_values)
        if not torch.is_tensor(out):
            pooled = getattr(out, "pooler_output", None)
            out = pooled if pooled is not None else out.last_hidden_state.mean(dim=1)
        return out.reshape(out.shape[0], -1)

    return extract


def parse_extractor_spec(spec: str) -> Tuple[str, str]:
    """``"pytorch-fid:PATH"`` / ``"hf:PATH"`` / a bare path -> (kind, path)."""
    prefix, sep, rest = str(spec).partition(":")
    if sep and prefix in ("pytorch-fid", "hf"):
        return prefix, os.path.expanduser(rest)
    kind = "pytorch-fid" if str(spec).endswith((".pth", ".pt")) else "hf"
    return kind, os.path.expanduser(str(spec))


def load_feature_extractor(spec: str, device: str = "cpu") -> Callable:
    """A callable mapping a list of PIL images to a (N, D) feature tensor (see module doc)."""
    kind, path = parse_extractor_spec(spec)
    if kind == "pytorch-fid":
        return _pytorch_fid_extractor(path, device)
    return _transformers_extractor(path, device)


@torch.no_grad()
def extract_features(extractor: Callable, paths: Sequence, batch_size: int = 32) -> np.ndarray:
    feats = [extractor(load_rgb(chunk)).double().cpu().numpy()
             for chunk in batched(list(paths), batch_size)]
    if not feats:
        raise ValueError("no images to extract FID features from")
    return np.concatenate(feats)


def summarize_fid(gen_features: np.ndarray, ref_features: np.ndarray, extractor: str) -> Dict:
    return {"fid": fid_from_features(gen_features, ref_features), "images": len(gen_features),
            "reference_images": len(ref_features), "feature_extractor": extractor}

