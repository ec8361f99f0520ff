"""Run a training script with test-only instrumentation, changing no number it computes.

    python tests/reliability_launcher.py training/train_munba_sd.py --arg ...

* RELIABILITY_SLOW_BACKWARD=<seconds>: every backward pass sleeps first, so that a SIGKILL sent
  right after a checkpoint lands in the middle of the following steps.
* RELIABILITY_DUMP_WEIGHTS=<folder>: at exit, every process writes the trainable weights of the
  models it passed to ``Accelerator.prepare`` to ``<folder>/rank<i>.safetensors``, so a
  multi-process test can check that all ranks end with the same weights.
* RELIABILITY_CRASH_IN_FINAL_SAVE=1: the first safetensors file written into a final-output
  staging folder (a path containing ".staging-") gets half its bytes, then the process SIGKILLs
  itself: a crash in the middle of the final save.
"""

import atexit
import os
import runpy
import sys
import time

import torch

_delay = float(os.environ.get("RELIABILITY_SLOW_BACKWARD", "0"))
_dump = os.environ.get("RELIABILITY_DUMP_WEIGHTS")

if _delay > 0:
    _backward = torch.Tensor.backward

    def _slow_backward(self, *args, **kwargs):
        time.sleep(_delay)
        return _backward(self, *args, **kwargs)

    torch.Tensor.backward = _slow_backward

if _dump:
    import accelerate

    _accelerators = []
    _prepare = accelerate.Accelerator.prepare

    def _recording_prepare(self, *args, **kwargs):
        _accelerators.append(self)
        return _prepare(self, *args, **kwargs)

    accelerate.Accelerator.prepare = _recording_prepare

    @atexit.register
    def _dump_weights():
        from safetensors.torch import save_file

        state = {}
        for acc in _accelerators[-1:]:
            for i, model in enumerate(acc._models):
                model = acc.unwrap_model(model)
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        state[f"{i}.{name}"] = p.detach().cpu().contiguous()
        if state:
            os.makedirs(_dump, exist_ok=True)
            rank = int(os.environ.get("RANK", "0"))
            save_file(state, os.path.join(_dump, f"rank{rank}.safetensors"))

if os.environ.get("RELIABILITY_CRASH_IN_FINAL_SAVE"):
    import signal

    import safetensors.torch

    _save_file = safetensors.torch.save_file

    def _crashing_save_file(tensors, filename, *args, **kwargs):
        if ".staging-" not in str(filename):
            return _save_file(tensors, filename, *args, **kwargs)
        data = safetensors.torch.save(tensors, *args, **kwargs)
        with open(filename, "wb") as f:
            f.write(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = _crashing_save_file

script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
