"""Evaluation of unlearned models: classification metrics (accuracy, MIA, Avg. Gap) and
generative metrics (NudeNet counts, generated-image classification, CLIP score, FID)."""
