"""SDUnlearner under DDP: each rank draws the whole global batch's random numbers and keeps its
own rows, so N ranks x batch b compute exactly the per-sample losses of 1 process x batch N*b."""

import pytest
import torch

from hf_munba.diffusion.unlearner import SDUnlearner
from hf_munba.testing import tiny_sd_pipeline


def _batch(pipe, rows):
    g = torch.Generator().manual_seed(0)
    px = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    ids = lambda t: pipe.tokenizer([t] * 4, padding="max_length", max_length=77,
                                   return_tensors="pt").input_ids[rows]
    return {"retain_pixel_values": px[rows], "forget_pixel_values": px.flip(0)[rows],
            "retain_input_ids": ids("a person"), "forget_input_ids": ids("nudity"),
            "anchor_input_ids": ids("a photo of a person wearing clothes"),
            "uncond_input_ids": ids("")}


@pytest.mark.parametrize("objective", ["remap", "esd"])
def test_two_ranks_halves_average_to_the_single_process_losses(objective):
    pipe = tiny_sd_pipeline()
    kw = dict(forget_objective=objective)
    single = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, **kw)
    torch.manual_seed(7)
    with torch.no_grad():
        full = [float(x) for x in single.losses(_batch(pipe, slice(0, 4)))]
    ranks = []
    for rank in (0, 1):
        un = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, num_processes=2,
                         process_index=rank, **kw)
        torch.manual_seed(7)  # every rank is seeded alike
        with torch.no_grad():
            ranks.append([float(x) for x in un.losses(_batch(pipe, slice(2 * rank, 2 * rank + 2)))])
    # DDP averages the ranks' gradients: the mean of the ranks' mean losses is the global mean
    mean = [(a + b) / 2 for a, b in zip(*ranks)]
    assert mean == pytest.approx(full, rel=1e-5)
    assert ranks[0] != pytest.approx(ranks[1], rel=1e-3)  # the ranks do not share noise


def test_evaluate_is_not_split_over_ranks():
    pipe = tiny_sd_pipeline()
    b = [_batch(pipe, slice(0, 4))]
    single = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler).evaluate(b, seed=1)
    rank1 = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, num_processes=2,
                        process_index=1)
    assert rank1.evaluate(b, seed=1) == single
    assert rank1.num_processes == 2 and rank1.process_index == 1
    with pytest.raises(ValueError, match="process_index"):
        SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, num_processes=2,
                    process_index=2)
