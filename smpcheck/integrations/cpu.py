"""Run accelerate's FSDP path on CPU with gloo, so CI can exercise what the GPUs will run.

accelerate 1.15 silently drops an FSDP plugin on CPU: ``AcceleratorState`` only switches to
``DistributedType.FSDP`` from a GPU-like distributed type, so a CPU run under ``torchrun``
trains with DDP instead, unsharded, and every check of the wrapped model passes vacuously.
Three more CPU-only refusals stand between a CPU run and FSDP1 (measured on torch 2.13,
accelerate 1.15, transformers 5.24):

* accelerate's device is ``cpu:0`` but FSDP1's compute device is ``cpu``: FSDP1 raises
  "Inconsistent compute device and `device_id`";
* the plugin refuses ``sync_module_states`` (which ``cpu_ram_efficient_loading`` forces for
  FSDP1) with "There are currently no available devices found";
* FSDP1 refuses CPU module states in ``_check_module_states_for_sync_module_states``, although
  gloo broadcasts CPU tensors fine.

:func:`enable_fsdp_on_cpu` lifts exactly these, and only on CPU: with a GPU the plugin and
FSDP1 see their usual checks, and a GPU run never reaches the patched state branch.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from smpcheck.run.compat import accelerate_fsdp_unavailable

_PATCHED = "_smpcheck_cpu_fsdp"


def enable_fsdp_on_cpu() -> None:
    """Make accelerate (and the Trainer through it) apply its FSDP plugin on CPU ranks.

    Call it once, before ``Accelerator(...)`` or ``Trainer(...)``; calling it again does
    nothing. It is for CPU runs (CI, laptops): on a GPU machine it changes nothing.

    Raises:
        RuntimeError: the installed accelerate predates the plugin these patches know.
    """
    reason = accelerate_fsdp_unavailable()
    if reason:
        raise RuntimeError(f"enable_fsdp_on_cpu: {reason}")
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import _init_utils

    if getattr(AcceleratorState.__init__, _PATCHED, False):
        return
    AcceleratorState.__init__ = _honour_plugin_on_cpu(AcceleratorState.__init__)
    FullyShardedDataParallelPlugin.__post_init__ = _sync_states_on_cpu(
        FullyShardedDataParallelPlugin.__post_init__)
    _init_utils._check_module_states_for_sync_module_states = _cpu_states_allowed(
        _init_utils._check_module_states_for_sync_module_states)


def _honour_plugin_on_cpu(original: Any) -> Any:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    @functools.wraps(original)
    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        fresh = not AcceleratorState._shared_state
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if not (fresh and fsdp_plugin is not None
                and self.distributed_type == DistributedType.MULTI_CPU):
            return
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        # FSDP1 compares its compute device (``cpu``) with ``device_id``: no index on CPU.
        self.device = PartialState._shared_state["device"] = torch.device("cpu")

    setattr(init, _PATCHED, True)
    return init


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _sync_states_on_cpu(original: Any) -> Any:
    @functools.wraps(original)
    def post_init(self: Any) -> None:
        if torch.accelerator.is_available():
            return original(self)
        version = int(self.fsdp_version or os.environ.get("FSDP_VERSION", 1))
        if self.cpu_ram_efficient_loading is None:
            self.cpu_ram_efficient_loading = _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING")
        if self.sync_module_states is None and version == 1:
            self.sync_module_states = _env_flag("FSDP_SYNC_MODULE_STATES")
        ram_efficient = self.cpu_ram_efficient_loading
        sync = version == 1 and bool(self.sync_module_states or ram_efficient)
        if sync:  # what the original refuses without a GPU: set it after it ran
            self.sync_module_states = self.cpu_ram_efficient_loading = False
        original(self)
        if sync:
            self.sync_module_states, self.cpu_ram_efficient_loading = True, ram_efficient
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = str(ram_efficient)
            self.param_init_fn = _materialise_on_cpu

    return post_init


def _materialise_on_cpu(module: torch.nn.Module) -> None:
    """accelerate's ``param_init_fn`` for ``sync_module_states``, with the CPU as device."""
    module.to_empty(device=torch.device("cpu"), recurse=False)


def _cpu_states_allowed(original: Any) -> Any:
    @functools.wraps(original)
    def guard(module_states: list[torch.Tensor]) -> None:
        if not all(t.device.type == "cpu" for t in module_states):
            original(module_states)

    return guard
