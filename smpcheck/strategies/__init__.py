"""One module per way through load -> [transform] -> wrap. The CLI picks one by name."""

from smpcheck.strategies.accelerate_fsdp import AccelerateFSDP1, AccelerateFSDP2
from smpcheck.strategies.base import RunOptions, Strategy
from smpcheck.strategies.deepspeed_zero import DeepSpeedZero2, DeepSpeedZero3
from smpcheck.strategies.external import SageMakerSMP, TransformersTPPlan
from smpcheck.strategies.recipes import FSDP2FromRank0, Naive, SMPRecipe, Streaming

STRATEGIES: dict[str, type] = {
    s.name: s
    for s in (SMPRecipe, FSDP2FromRank0, Naive, Streaming, TransformersTPPlan, SageMakerSMP,
              AccelerateFSDP2, AccelerateFSDP1, DeepSpeedZero3, DeepSpeedZero2)
}

__all__ = ["STRATEGIES", "RunOptions", "Strategy"]
