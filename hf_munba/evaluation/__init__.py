"""Evaluation of unlearned models: classification metrics (accuracy, MIA, Avg. Gap), forget/retain
trade-off curves at equal forgetting (``tradeoff``) and generative metrics (NudeNet counts,
generated-image classification, CLIP score, FID)."""
