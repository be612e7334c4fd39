"""How updates merge.

- ``averaging.py``: ``RoundAverager`` — hivemind's all-reduce, one group per job and round.
"""

from aggregation.averaging import RoundAverager

__all__ = ["RoundAverager"]
