"""Tensors no checkpoint holds (a new head, an adapter, new vocabulary rows): the rule that
gave them their first values (``init_rules``), found by replaying the init function on a meta
twin (``init_replay``), a piece's moments (``init_stats``) and the judge of a piece against its
rule (``init_judge``).
"""
