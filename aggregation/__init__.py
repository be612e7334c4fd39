"""How updates merge.

- ``averaging.py``: ``RoundAverager`` — hivemind's all-reduce, one group per job and round, or a
  large round's stages of small groups (``merge_in_stages``).
- ``groups.py``: which members average with whom in those stages (``plan_stages``), pure.
- ``secagg.py``: secure aggregation's protocol (masks, Shamir shares, unmasking) as pure functions;
  its ``secure_sum`` reducer adds the masked integers inside the same all-reduce.
"""

from aggregation.averaging import RoundAverager

__all__ = ["RoundAverager"]
