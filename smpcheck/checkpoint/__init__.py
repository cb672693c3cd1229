"""Checkpoint formats and the model directory a run names.

* :mod:`~smpcheck.checkpoint.reader`: a safetensors checkpoint, read lazily under the model's
  own names (:class:`Checkpoint`, re-exported here);
* :mod:`~smpcheck.checkpoint.dcp`: a torch.distributed.checkpoint directory with the same
  surface, and ``open_checkpoint``, which picks the format;
* :mod:`~smpcheck.checkpoint.source`: what the user named, resolved to a local directory (the
  built-in demo model: :mod:`~smpcheck.checkpoint.demo`);
* :mod:`~smpcheck.checkpoint.inputs`: that directory validated from headers alone.

The reader is ``reader.py``, not ``safetensors.py``, so that no module here shadows the
``safetensors`` library.
"""

from smpcheck.checkpoint.reader import (
    Checkpoint,
    CheckpointError,
    changed_files,
    file_identities,
    model_names,
)

# The error is named where users import it from (a report says "the check itself raised
# smpcheck.checkpoint.CheckpointError: ..."), not by the module that happens to define it.
CheckpointError.__module__ = __name__

__all__ = ["Checkpoint", "CheckpointError", "changed_files", "file_identities", "model_names"]
