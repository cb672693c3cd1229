"""A readable reference of the SMP v2 fine-tuning recipe: delayed parameter init and TP.

Names follow SMP (``torch.sagemaker``) so a script moves over by changing one import.
"""

from reference_impl.adapters import attach_adapter
from reference_impl.delayed_param import DelayedParamIniter, ParamInitError
from reference_impl.fsdp import allow_cpu_sync_module_states, apply_fsdp1, apply_fsdp2
from reference_impl.loading import (
    LoadSpec,
    build_meta_model,
    load_on_rank0,
    resize_vocabulary,
    split_from_pretrained_kwargs,
)
from reference_impl.tp_plans import TPConfigError
from reference_impl.transform import build_mesh, transform

__all__ = [
    "DelayedParamIniter",
    "LoadSpec",
    "ParamInitError",
    "TPConfigError",
    "allow_cpu_sync_module_states",
    "apply_fsdp1",
    "apply_fsdp2",
    "attach_adapter",
    "build_mesh",
    "build_meta_model",
    "load_on_rank0",
    "resize_vocabulary",
    "split_from_pretrained_kwargs",
    "transform",
]
