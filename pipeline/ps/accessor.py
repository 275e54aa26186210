"""CTR accessor: show/click statistics, admission and eviction (Paddle CtrCommonAccessor style).

Every row carries ``show``, ``click`` and ``last_seen`` (unix seconds). Its score is
``(show - click) * nonclk_coeff + click * clk_coeff``. A row gets an embedding only
once its score reaches ``admit_threshold``; before that, pushes only update its
statistics, which keeps the long tail of one-off ids out of memory and out of the
pull view. Periodic ``shrink`` decays statistics and evicts stale or weak rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from pipeline.ps.initializers import id_uniform
from pipeline.ps.spec import AccessorSpec

__all__ = ["SECONDS_PER_DAY", "Clock", "CtrAccessor", "system_clock"]

F32 = npt.NDArray[np.float32]
Clock = Callable[[], int]
SECONDS_PER_DAY = 86_400
# Decorrelates the admission coin from the initializer stream of the same seed.
_ADMIT_SALT = 0xAD5EED


def system_clock() -> int:
    """Wall-clock unix seconds (the default clock; tests inject their own)."""
    return int(time.time())


class CtrAccessor:
    """Vectorized score, admission, decay and expiry over row statistics."""

    def __init__(self, spec: AccessorSpec, seed: int = 0) -> None:
        self.spec = spec
        self._coin_seed = (seed ^ _ADMIT_SALT) & (2**64 - 1)

    def score(self, show: F32, click: F32) -> F32:
        """Show/click score; clicks weigh ``clk_coeff``, non-click shows ``nonclk_coeff``."""
        s = self.spec
        return (show - click) * np.float32(s.nonclk_coeff) + click * np.float32(s.clk_coeff)

    def admit(self, ids: npt.NDArray[np.uint64], show: F32, click: F32) -> npt.NDArray[np.bool_]:
        """Which of these (not yet admitted) rows get an embedding now.

        With ``admit_probability < 1`` each id has a fixed coin (a hash of the id),
        so replays and restarts admit the same ids; an id whose coin fails is
        never admitted. That is the intent: p is the fraction of eligible ids
        that ever get an embedding.
        """
        ok = self.score(show, click) >= np.float32(self.spec.admit_threshold)
        p = self.spec.admit_probability
        if p < 1.0:
            ok &= id_uniform(ids, self._coin_seed) < p
        return ok

    def decay(self, show: F32, click: F32) -> None:
        """Multiply statistics by ``show_click_decay_rate`` in place (once per shrink)."""
        rate = np.float32(self.spec.show_click_decay_rate)
        show *= rate
        click *= rate

    def expired(
        self, show: F32, click: F32, last_seen: npt.NDArray[np.int64], now: int
    ) -> npt.NDArray[np.bool_]:
        """Rows to delete: score below ``delete_threshold`` or unseen for too many days."""
        s = self.spec
        unseen = (now - last_seen) > s.delete_after_unseen_days * SECONDS_PER_DAY
        return (self.score(show, click) < np.float32(s.delete_threshold)) | unseen

    def shrink(
        self, show: F32, click: F32, last_seen: npt.NDArray[np.int64], now: int
    ) -> npt.NDArray[np.bool_]:
        """Decay in place, then return the expiry mask (Paddle's Shrink order)."""
        self.decay(show, click)
        return self.expired(show, click, last_seen, now)
