"""Run by test_trainer_ddp.py under `accelerate launch --num_processes 2 --cpu`: each rank saves its weights."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hf_munba.testing import tiny_vit_classifier  # noqa: E402
from hf_munba.classification.trainer import MunbaArguments, MunbaTrainer  # noqa: E402
from trainer_helpers import targs, tiny_classification_data  # noqa: E402


def run(out: Path, per_device_batch: int):
    forget, retain = tiny_classification_data(n=32)  # 8 forget, 24 retain
    retain = type(retain)({k: v[:8] for k, v in retain.columns.items()})
    model = tiny_vit_classifier(num_labels=4)
    tr = MunbaTrainer(model=model, args=targs(out, per_device_train_batch_size=per_device_batch, max_steps=2,
                                              learning_rate=0.1),
                      train_dataset=retain, forget_dataset=forget,
                      munba_args=MunbaArguments(forget_loss="neg_ce"))
    tr.train()
    state = {k: v.detach().contiguous() for k, v in tr.accelerator.unwrap_model(tr.model).state_dict().items()}
    save_file(state, str(out / f"rank{tr.args.process_index}.safetensors"))
    return tr


if __name__ == "__main__":
    run(Path(sys.argv[1]), per_device_batch=4)
