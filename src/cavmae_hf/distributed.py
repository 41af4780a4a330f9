"""
The end of a `torch.distributed` run: [`end_distributed_run`] destroys the process group before the interpreter
exits, after the trainer's `DistributedDataParallel` wrapper is gone. The example scripts call it last.

Why a script must not leave this to interpreter shutdown (the native stack of an aborting process shows it): the
collective that a process runs last (for a `Trainer`, the all-gather of the FLOP counts just before `train()`
returns) is destroyed by the gloo worker thread that ran it, and destroying it drops the last reference to tensors
made in Python, which needs the GIL. When that thread asks for the GIL after the main thread has begun shutting the
interpreter down, Python ends the thread with `pthread_exit`; its unwinding reaches a C++ destructor (`noexcept`),
and the process aborts: "terminate called without an active exception", SIGABRT, after the model was saved.
Destroying the group joins those threads while the interpreter runs, with the GIL released.

The order matters: DDP's reducer holds the group too, and a reducer dropping the last reference destroys the group
with the GIL held, which deadlocks the same threads. So the wrapper is released and collected first.
"""

import gc
import weakref

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def end_distributed_run(trainer=None) -> bool:
    """
    Destroy the default `torch.distributed` process group (nothing to do outside `torch.distributed`); with a
    `Trainer`, release its `DistributedDataParallel` wrapper first (the trainer cannot train or evaluate under
    `torch.distributed` afterwards; its `model` is kept). Returns whether the group was destroyed.

    If the wrapper is still referenced elsewhere, the group is left alone with a warning: destroying it while a
    reducer holds it could deadlock when the reducer is freed.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    wrapper = None
    if trainer is not None:
        if trainer.model_wrapped is not trainer.model:
            wrapper = weakref.ref(trainer.model_wrapped)
        trainer.model_wrapped = trainer.model
        trainer.accelerator.free_memory()  # drops the prepared model, optimizer and data loaders; collects
    gc.collect()
    if wrapper is not None and wrapper() is not None:
        logger.warning(
            "end_distributed_run: the DistributedDataParallel wrapper is still referenced outside the trainer, so "
            "the process group is left to interpreter shutdown. Drop those references before calling it."
        )
        return False
    torch.distributed.destroy_process_group()
    return True
