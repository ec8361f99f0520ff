"""Small shared pieces for the MunbaTrainer tests: tiny data and TrainingArguments."""

import torch
from transformers import TrainingArguments

from hf_munba.classification.data import InMemoryDataset

torch.set_num_threads(1)


def tiny_classification_data(n=48, num_classes=4, seed=0, size=8, channels=1):
    """Learnable toy data: class c has a bright pixel row c. Returns (forget, retain) with class 0 forgotten."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = 0.3 * torch.randn(n, channels, size, size, generator=g)
    for i in range(n):
        x[i, :, int(y[i]) % size, :] += 1.0
    forget = y == 0
    return (InMemoryDataset({"pixel_values": x[forget], "labels": y[forget]}),
            InMemoryDataset({"pixel_values": x[~forget], "labels": y[~forget]}))


def targs(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=0.05,
                max_steps=2, optim="sgd", max_grad_norm=1.0, report_to=[], save_strategy="no",
                logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0, weight_decay=0.0,
                lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def params_vector(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])
