"""smpcheck where fine-tuning already runs, in the shape those tools use.

* :mod:`smpcheck.integrations.transformers`: ``SmpcheckCallback`` for ``transformers.Trainer``.
* :mod:`smpcheck.integrations.accelerate`: ``LoadingMonitor`` and ``verify_prepared`` around
  ``accelerator.prepare`` under the FSDP plugin.
* :mod:`smpcheck.integrations.cpu`: ``enable_fsdp_on_cpu``, so CI on CPU runs FSDP for real.

Nothing here is imported by ``import smpcheck``: each module imports its library on use.
"""

from smpcheck.integrations.outcome import SmpcheckFailed, SmpcheckWarning

__all__ = ["SmpcheckFailed", "SmpcheckWarning"]
