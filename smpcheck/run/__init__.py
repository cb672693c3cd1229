"""Running a check as a job: becoming a rank (``launch``), forked from the process's one warm
fork server (``forks``), and dying with its launcher (``lifeline``), the phases of one run
(``job``), how a run ends when a rank fails, dies or is stopped (``failures``, ``endings``,
``whereabouts``, planted ``faults``), the ``smpcheck plan`` command (``plan_cli``) and the
release shims the strategies need (``compat``). The layer that runs a recipe: with
``strategies/`` and ``cli.py``, the only one that may import ``reference_impl``.
Nothing is imported here, so ``import smpcheck.run.X`` loads only ``X``.
"""
