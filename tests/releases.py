"""Skip marks for tests of what only some supported releases can do, each with its reason.

``tox -e oldest`` runs the fast part of the suite on the oldest releases pyproject.toml admits;
a test that needs a later release's feature skips there with the sentence smpcheck itself
prints, never fails. The facts live in ``smpcheck.run.compat``.
"""

from __future__ import annotations

import pytest
from packaging.version import Version

from smpcheck.run.compat import (
                                   accelerate_fsdp_unavailable,
                                   tp_plan_unavailable,
                                   transformers_version,
)

#: The first transformers release whose ``LlamaPreTrainedModel._init_weights`` sets the RMSNorm
#: weight (to ones); before it a norm keeps its construction value and no init rule names it.
LLAMA_NORM_INIT = Version("4.52")

needs_tp_plan = pytest.mark.skipif(tp_plan_unavailable() is not None,
                                   reason=tp_plan_unavailable() or "")
needs_accelerate_fsdp = pytest.mark.skipif(accelerate_fsdp_unavailable() is not None,
                                           reason=accelerate_fsdp_unavailable() or "")
needs_transformers_5 = pytest.mark.skipif(
    transformers_version().major < 5,
    reason=f"transformers {transformers_version()} fuses no weights on load (MoE experts, "
           "conversion mapping): that is transformers 5's")
