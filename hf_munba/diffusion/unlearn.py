"""One call from a pipeline and a concept to the unlearned pipeline: ``hf_munba.unlearn``.

The training script's whole path (check the inputs, train, save, model card) is
:func:`hf_munba.diffusion.trainer.train`; this module only turns Python values into the
:class:`~hf_munba.diffusion.config.SDUnlearningConfig` the script would build, so what a notebook
gets is what ``train_munba_sd.py`` gets with the same flags:

* a pipeline object is saved once to a working folder and trained from there (it is used as is:
  never re-downloaded, never modified);
* prompts become data the way ``training/generate_unlearning_data.py`` makes it
  (:func:`~hf_munba.diffusion.generation.generate_unlearning_data`, images from the base
  pipeline); a ``datasets.Dataset`` is written as an imagefolder; a folder is read as it is;
* a dict of concepts is ``--forget_manifest``: each concept its own bargaining player;
* every other keyword is a script flag (``max_train_steps=``, ``use_lora=``...), checked by name
  before any work, with the close matches of a misspelt one.

The working folder (the saved base pipeline, generated data) is temporary and removed at the end;
the result is loaded into memory before that, so without ``output_dir`` nothing stays on disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

__all__ = ["unlearn", "UNLEARN_OWN_ARGUMENTS"]

#: the config fields ``unlearn`` sets from its own arguments (refused as options)
UNLEARN_OWN_ARGUMENTS = {
    "pretrained_model_name_or_path": "pipeline_or_path", "method": "method",
    "output_dir": "output_dir", "forget_data_dir": "forget", "forget_dataset_name": "forget",
    "forget_concepts": "forget", "forget_manifest": "forget", "retain_data_dir": "retain",
    "retain_dataset_name": "retain"}
#: image generation for prompt-only sources (``generate_unlearning_data``'s settings)
GENERATION_DEFAULTS = {"num_images_per_prompt": 25, "generation_inference_steps": 50,
                       "generation_guidance_scale": 7.5, "generation_batch_size": 4}

Source = Union[str, os.PathLike, Sequence[str], Any]


def _check_options(options: Mapping[str, Any]) -> None:
    from .config import SDUnlearningConfig

    fields = [f.name for f in dataclasses.fields(SDUnlearningConfig)]
    for key in options:
        if key in UNLEARN_OWN_ARGUMENTS:
            raise TypeError(f"unlearn(): {key!r} is set by the argument "
                            f"{UNLEARN_OWN_ARGUMENTS[key]!r}; pass it there")
        if key not in fields and key not in GENERATION_DEFAULTS:
            close = difflib.get_close_matches(key, fields + list(GENERATION_DEFAULTS), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                " (the options are train_munba_sd.py's flags without the dashes)"
            raise TypeError(f"unlearn() got an unknown option {key!r}{hint}")


def _kind(source, what: str) -> str:
    """'prompts', 'folder' or 'dataset' (a ``datasets.Dataset``); TypeError otherwise."""
    if isinstance(source, os.PathLike):
        return "folder"
    if isinstance(source, str):
        return "folder" if os.path.isdir(os.path.expanduser(source)) else "prompts"
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(p, str) and p.strip() for p in source):
            raise ValueError(f"{what}: a list of prompts must hold non-empty strings")
        return "prompts"
    if hasattr(source, "column_names") and hasattr(source, "features"):
        return "dataset"
    raise TypeError(f"{what}: give prompts (a str or list of str), a data folder, a "
                    f"datasets.Dataset or (forget only) a dict name -> source; got "
                    f"{type(source).__name__}")


def _write_dataset(ds, folder: Path, image_column: str, caption_column: str) -> str:
    """A ``datasets.Dataset`` as an imagefolder (PNG + metadata.jsonl), what the config reads."""
    from .data import dataset_source

    src = dataset_source(ds, image_column, caption_column, name="dataset", role=folder.name)
    folder.mkdir(parents=True)
    lines = []
    for i in range(len(src)):
        name = f"{i:06d}.png"
        src.load_image(i).save(folder / name)
        lines.append(json.dumps({"file_name": name, caption_column: src.captions[i]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder)


def _pipeline_resolution(pipe, path) -> Optional[int]:
    """The native image size of the pipeline's family (denoiser sample size x the VAE's
    down-sampling factor; Flux: its pipeline's default)."""
    from .families import detect_family, family_of_pipeline

    try:
        family = family_of_pipeline(pipe) if pipe is not None else detect_family(path)
        return family.native_resolution
    except Exception:  # a Hub id offline, an odd pipeline: the config's default then
        return None


def unlearn(pipeline_or_path, forget, retain, method: str = "munba",
            output_dir: Optional[Union[str, os.PathLike]] = None, **options):
    """Unlearn ``forget`` from a Stable Diffusion pipeline, keeping ``retain``; return the pipeline.

    ``pipeline_or_path``: a ``DiffusionPipeline`` of any supported family (SD 1.x/2.x, SDXL,
    SD 3, Flux: :mod:`hf_munba.diffusion.families`; used as is, not modified) or a local folder /
    Hub id. ``forget`` / ``retain``: prompts (a str or list of str: the images are
    generated with the base pipeline, as ``training/generate_unlearning_data.py`` does), a data
    folder (images + ``metadata.jsonl``) or a ``datasets.Dataset`` (columns ``image_column`` /
    ``caption_column``, default ``image`` / ``text``). ``forget`` may be a dict name -> source
    (or name -> ``{"prompts": [...], "anchor_prompt": "..."}``, the ``--forget_manifest`` entry):
    each concept is its own bargaining player (``forget_players="pooled"`` for one forget
    player). With generated D_f the prompts are also what the forget player conditions on.

    ``method``: ``munba`` (recommended), ``munba-paper``, ``weighted``, ``ft`` or ``ga``.
    ``options``: ``train_munba_sd.py``'s flags as keywords (``max_train_steps=100``,
    ``learning_rate=1e-5``, ``use_lora=True``, ``anchor_prompt="..."``...; ``resolution``
    defaults to the pipeline's native size, ``report_to`` to ``"none"``), plus the generation of
    prompt-only sources: ``num_images_per_prompt`` (25), ``generation_inference_steps`` (50),
    ``generation_guidance_scale`` (7.5), ``generation_batch_size`` (4). A misspelt option is a
    ``TypeError`` naming the close matches, before any work.

    Returns the unlearned ``DiffusionPipeline`` in memory (LoRA: the base with the adapter
    loaded). ``output_dir``: where the run's folder (model, model card, logs, ``history.jsonl``)
    is kept; default a temporary folder, removed once the pipeline is loaded.

    Example (offline, the tiny test pipeline; a real run uses e.g. CompVis/stable-diffusion-v1-4
    and its defaults)::

        >>> import hf_munba
        >>> from hf_munba.testing import tiny_sd_pipeline
        >>> pipe = hf_munba.unlearn(
        ...     tiny_sd_pipeline(), forget={"nudity": "nudity", "violence": "violence"},
        ...     retain="a person wearing clothes", max_train_steps=2, train_batch_size=2,
        ...     learning_rate=1e-3, num_images_per_prompt=2, generation_inference_steps=2)
        >>> type(pipe).__name__
        'StableDiffusionPipeline'
        >>> image = pipe("violence", num_inference_steps=2).images[0]
    """
    from .config import SDUnlearningConfig

    _check_options(options)
    gen = {k: options.pop(k, v) for k, v in GENERATION_DEFAULTS.items()}
    image_column = options.get("image_column", "image")
    caption_column = options.get("caption_column", "text")
    pipe = None if isinstance(pipeline_or_path, (str, os.PathLike)) else pipeline_or_path
    if pipe is not None:
        from diffusers import DiffusionPipeline

        from .families import family_for_pipeline_class

        if not isinstance(pipe, DiffusionPipeline):  # not only UNet pipelines: SD 3 / Flux too
            raise TypeError(f"pipeline_or_path: a diffusers pipeline or a path, got "
                            f"{type(pipe).__name__}")
        family_for_pipeline_class(type(pipe).__name__)  # an unsupported pipeline: one error now
    concepts = dict(forget) if isinstance(forget, Mapping) else None
    if concepts is not None and not concepts:
        raise ValueError("forget: the dict of concepts is empty")
    if concepts is not None and len(concepts) == 1:  # one named concept: the single forget set
        (name, entry), = concepts.items()
        _entry_kind(entry, f"forget[{name!r}]")
        concepts = None
        forget = _source(entry)
        if isinstance(entry, Mapping):  # its manifest keys become the single-set flags
            if entry.get("anchor_prompt") is not None:
                options.setdefault("anchor_prompt", entry["anchor_prompt"])
            if entry.get("prompts") is not None and _source(entry) is not entry["prompts"]:
                options.setdefault("forget_prompts", _as_prompts(entry["prompts"]))
    kinds = {name: _entry_kind(v, f"forget[{name!r}]") for name, v in concepts.items()} \
        if concepts is not None else None
    forget_kind = None if concepts is not None else _kind(forget, "forget")
    retain_kind = _kind(retain, "retain")
    if concepts is not None:
        from ..unlearning.methods import check_forget_names

        check_forget_names(list(concepts))

    # Every value check of the script, before anything is saved or generated (the data paths
    # are placeholders here: no disk is read by the config's own checks).
    placeholder = ({"forget_manifest": "concepts.json"} if concepts is not None
                   else {"forget_data_dir": "forget"})
    SDUnlearningConfig(pretrained_model_name_or_path=os.fspath(pipeline_or_path)
                       if pipe is None else "pipeline", method=method,
                       output_dir=os.fspath(output_dir or "output"), retain_data_dir="retain",
                       **placeholder, **options)
    if output_dir is not None:
        from ..utils.atomic_save import ensure_output_dir

        ensure_output_dir(output_dir, options.get("overwrite_output_dir", False),
                          allow_existing=bool(options.get("resume_from_checkpoint")),
                          check_only=True)

    with tempfile.TemporaryDirectory(prefix="hf_munba_unlearn_") as work:
        work = Path(work)
        if pipe is not None:  # trained from a saved copy: the caller's object stays untouched
            base = str(work / "base")
            pipe.save_pretrained(base, safe_serialization=True)
        else:
            base = os.fspath(pipeline_or_path)
        if "resolution" not in options:
            res = _pipeline_resolution(pipe, base)
            if res is not None:
                options["resolution"] = res
        options.setdefault("report_to", "none")
        values: Dict[str, Any] = {}
        prompts_needed = {} if concepts is None else {
            n: _prompts(v) for n, v in concepts.items() if kinds[n] == "prompts"}
        single_prompts = _as_prompts(forget) if forget_kind == "prompts" else None
        retain_prompts = _as_prompts(retain) if retain_kind == "prompts" else None
        generated = None
        if prompts_needed or single_prompts or retain_prompts:
            generated = _generate(pipe, base, work / "data", gen, options["resolution"]
                                  if "resolution" in options else None,
                                  forget=prompts_needed or single_prompts,
                                  retain=retain_prompts,
                                  seed=options.get("seed", 0))
        # ---- forget
        if concepts is not None:
            manifest = {}
            for n, v in concepts.items():
                entry = dict(v) if isinstance(v, Mapping) else {}
                for key in ("source", "dataset", "data_dir"):  # replaced by the folder below
                    entry.pop(key, None)
                if kinds[n] == "prompts":
                    entry["data_dir"] = generated["forget"][n]
                    entry.setdefault("prompts", prompts_needed[n])
                elif kinds[n] == "folder":
                    entry["data_dir"] = os.path.abspath(os.path.expanduser(
                        os.fspath(_source(v))))
                else:
                    entry["data_dir"] = _write_dataset(_source(v), work / f"forget_{n}",
                                                       image_column, caption_column)
                manifest[n] = entry
            path = work / "concepts.json"
            path.write_text(json.dumps(manifest, indent=2))
            values["forget_manifest"] = str(path)
        elif forget_kind == "prompts":
            values["forget_data_dir"] = generated["forget"]
            options.setdefault("forget_prompts", single_prompts)
        elif forget_kind == "folder":
            values["forget_data_dir"] = os.fspath(forget)
        else:
            values["forget_data_dir"] = _write_dataset(forget, work / "forget", image_column,
                                                       caption_column)
        # ---- retain
        if retain_kind == "prompts":
            values["retain_data_dir"] = generated["retain"]
        elif retain_kind == "folder":
            values["retain_data_dir"] = os.fspath(retain)
        else:
            values["retain_data_dir"] = _write_dataset(retain, work / "retain", image_column,
                                                       caption_column)
        out = Path(output_dir) if output_dir is not None else work / "output"
        config = SDUnlearningConfig(pretrained_model_name_or_path=base, method=method,
                                    output_dir=str(out), **values, **options)
        from .trainer import train

        train(config)
        return _load_result(out, base, config)


def _entry_kind(value, what: str) -> str:
    """A concept's source: a plain source, or a manifest-style dict (prompts / data_dir /
    dataset_name / source, and an optional anchor_prompt)."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"prompts", "data_dir", "dataset", "source",
                                       "anchor_prompt"})
        if unknown:
            raise ValueError(f"{what}: unknown keys {unknown} (prompts, data_dir, dataset, "
                             f"source, anchor_prompt)")
        src = _source(value)
        if src is None:
            raise ValueError(f"{what}: give its prompts, data_dir, dataset or source")
        return _kind(src, what)
    return _kind(value, what)


def _source(value):
    if not isinstance(value, Mapping):
        return value
    for key in ("source", "data_dir", "dataset"):
        if value.get(key) is not None:
            return value[key]
    return value.get("prompts")


def _as_prompts(value) -> List[str]:
    return [value] if isinstance(value, str) else list(value)


def _prompts(value) -> List[str]:
    return _as_prompts(_source(value))


def _generate(pipe, base: str, folder: Path, gen: Mapping, resolution, *, forget, retain, seed):
    """D_f / D_r from the base pipeline (the object itself when one was given)."""
    from .generation import generate_unlearning_data

    if pipe is None:
        from .families import load_pipeline

        pipe = load_pipeline(base)
    return generate_unlearning_data(
        pipe, folder, forget=forget, retain=retain,
        num_images_per_prompt=gen["num_images_per_prompt"], seed=seed,
        batch_size=gen["generation_batch_size"], guidance_scale=gen["generation_guidance_scale"],
        num_inference_steps=gen["generation_inference_steps"], height=resolution,
        width=resolution, progress=False)


def _load_result(out: Path, base: str, config):
    """The trained pipeline, in memory (the folder may be a temporary one about to go)."""
    from .families import load_pipeline

    if config.use_lora and not config.fuse_lora:
        pipe = load_pipeline(base)
        pipe.load_lora_weights(str(out))
    else:
        pipe = load_pipeline(str(out))
    return pipe  # the weights are in memory: removing the folder afterwards is safe
