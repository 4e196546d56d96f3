"""bandadv: fused group-relative advantages, success statistics and band masks for GRPO-style RL."""

from . import ops
from .advantages import group_advantages
from .band import BandController
from .config import PRESETS, AdvantageConfig
from .reference import reference_group_advantages
from .tracker import PromptTracker
from .types import GroupAdvantages, GroupStats, Reason

__all__ = [
    "PRESETS",
    "AdvantageConfig",
    "BandController",
    "GroupAdvantages",
    "GroupStats",
    "PromptTracker",
    "Reason",
    "group_advantages",
    "ops",
    "reference_group_advantages",
]
__version__ = "0.1.0"
