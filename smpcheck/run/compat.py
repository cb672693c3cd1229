"""What differs between the transformers releases smpcheck supports, decided in one place.

pyproject.toml declares ``transformers>=4.50,<6``; ``tox -e oldest`` runs the fast part of the
suite on the lower bounds. Each fact here names the release that changed it, so a reader can
drop it when the lower bound moves past that release.
"""

from __future__ import annotations

from functools import cache

from packaging.version import Version

#: The first transformers release whose ``from_pretrained(tp_plan=...)`` runs without an
#: accelerator: 4.50 opens the checkpoint on device index ``rank % device_count`` (CUDA
#: ordinal 0 on a CPU host).
TP_PLAN_ON_CPU = Version("4.51")
#: The first accelerate release whose FSDP plugin has ``fsdp_version`` (FSDP2): before it,
#: every FSDP plugin is FSDP1 with other fields, and the CPU patches of
#: ``smpcheck.integrations.cpu`` were measured on the later plugin only.
ACCELERATE_FSDP_VERSION = Version("1.6")


def _version(package: str) -> Version:
    """The installed release of ``package`` (its base version: ``5.0.0.dev0`` is ``5.0.0``)."""
    from importlib.metadata import version

    return Version(Version(version(package)).base_version)


@cache
def transformers_version() -> Version:
    """The installed transformers release."""
    return _version("transformers")


@cache
def accelerate_version() -> Version:
    """The installed accelerate release."""
    return _version("accelerate")


@cache
def dtype_kwarg() -> str:
    """The ``from_pretrained`` keyword for the load dtype: ``dtype`` since transformers 4.56,
    ``torch_dtype`` before (4.50 passes an unknown ``dtype`` on to the model's ``__init__``,
    which raises)."""
    from transformers import PretrainedConfig

    return "dtype" if hasattr(PretrainedConfig(), "dtype") else "torch_dtype"


def tp_plan_unavailable() -> str | None:
    """Why transformers' own ``tp_plan`` cannot run on this machine (None when it can)."""
    import torch

    version = transformers_version()
    if version >= TP_PLAN_ON_CPU or torch.accelerator.is_available():
        return None
    return (f"transformers {version}'s tp_plan loads every shard onto an accelerator and this "
            f"machine has none; install transformers>={TP_PLAN_ON_CPU} to run it on CPU, or "
            "run it on GPUs")


def accelerate_fsdp_unavailable() -> str | None:
    """Why smpcheck's accelerate FSDP path (the ``accelerate-fsdp*`` strategies and
    ``enable_fsdp_on_cpu``) cannot run with the installed accelerate (None when it can)."""
    version = accelerate_version()
    if version >= ACCELERATE_FSDP_VERSION:
        return None
    return (f"accelerate {version}'s FSDP plugin predates fsdp_version (FSDP2), which this path "
            f"sets; install accelerate>={ACCELERATE_FSDP_VERSION} to run it")


def fsdp_version_of(plugin: object) -> int:
    """The FSDP version an accelerate FSDP plugin applies (1 before accelerate had FSDP2)."""
    return int(getattr(plugin, "fsdp_version", None) or 1)
