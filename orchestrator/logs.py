"""What a user reads: our own lines (plan, progress, summary) and the libraries' warnings and errors. The
libraries' routine chatter is off unless `verbose=true`:

* DeepSpeed's "Setting accelerator to CPU" warning (each CPU worker pins DS_ACCELERATOR=cpu instead of probing),
* Ray Train's per-report "Reporting training result ..." line from every worker,
* transformers' load reports (the UNEXPECTED / MISSING rows when a checkpoint's head is not the task's) and its
  "Writing model shards" bars,
* the FutureWarning torch.distributed raises for DeepSpeed's all_gather_into_tensor.

Ray Train's preemption watcher, whose actor logged an ERROR line per job, is off (launch/ray_train.py says why).
"""

from __future__ import annotations

import logging
import os
import warnings


def pin_cpu_accelerator() -> None:
    """A worker without CUDA tells DeepSpeed it is a CPU worker before DeepSpeed is imported (DeepSpeed
    otherwise probes and warns 'Setting accelerator to CPU. If you have GPU ...' in every worker)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def quiet_libraries(verbose: bool) -> None:
    """Libraries' INFO chatter off in this process (a worker, or the local launcher's one process)."""
    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:  # Ray Train names this logger after its file
        from ray.train.v2._internal.execution import context as ray_train_context

        logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # not under Ray Train (launcher=local without Ray installed)
        pass
