"""The Squeeze-Release cycle: prune, fine-tune with the masks held, minimize, release the zeros left
inside compacted tensors as calibrated noise, fine-tune, repeat.

``loop`` runs it (``settings`` configures it, ``phases`` are the steps of a cycle, ``finishing`` the
phase after the loop), ``records`` is what it returns, ``checkpoints`` writes and resumes it, ``release``
is the calibrated release, ``criteria`` the pruning criteria, ``training`` the helpers for the user's
own training loop, ``distributed`` sharded (FSDP2) training inside it. See ``docs/squeeze-release.md``.
"""
from .checkpoints import finish_checkpoint, latest_checkpoint, load_checkpoint, load_finished
from .distributed import gather_full_model, shard_copy, sharded
from .criteria import MacScaled, global_magnitude, layer_magnitude, magnitude, prunable, unit_scaled_magnitude
from .loop import squeeze_release
from .records import CycleRecord, FinishRecord, SqueezeReleaseResult, TrainStep
from .settings import (CheckpointSettings, FinishSettings, PruneSettings, ReleaseSettings, SqueezeReleaseSettings,
                       StopSettings)
from .release import ReleaseResult, release
from .training import group_lasso, hold_masks

__all__ = [
    "CheckpointSettings", "CycleRecord", "FinishRecord", "FinishSettings", "MacScaled", "PruneSettings",
    "ReleaseResult", "ReleaseSettings", "SqueezeReleaseResult", "SqueezeReleaseSettings", "StopSettings", "TrainStep",
    "finish_checkpoint", "gather_full_model", "global_magnitude", "group_lasso", "hold_masks", "latest_checkpoint", "layer_magnitude",
    "load_checkpoint", "load_finished", "magnitude", "prunable", "release", "shard_copy", "sharded", "squeeze_release",
    "unit_scaled_magnitude",
]
