"""The prune as one job, in the order data flows: the calibration data, the engine's passes, the planner's split
(--target-params), the frozen `Decision` (what to keep and why: `decide`), then the cut (`apply` in memory,
`write` to a checkpoint). The CLI's `score`, `plan` and `prune` and the Python API run the same code."""
from .calibration import calibrate, renumber, token_counts
from .cut import apply, prune, write
from .decide import decide
from .records import STEPS, CheckFailed, Decision

__all__ = ["STEPS", "CheckFailed", "Decision", "apply", "calibrate", "decide", "prune", "renumber", "token_counts", "write"]
