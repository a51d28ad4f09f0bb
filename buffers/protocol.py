"""The ReplayBuffer contract every buffer implements."""

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ReplayBuffer(Protocol):
    """A bounded memory of token sequences drawn from an endless stream.

    ``add_many`` offers sequences in stream order; ``sample`` draws from what is
    kept. ``state_dict`` holds everything needed to continue identically: the
    kept sequences, the count seen and the random state.
    """

    @property
    def seen(self) -> int:
        """Sequences offered since the buffer was created (kept or not)."""
        ...

    def __len__(self) -> int: ...

    def add_many(self, items: Sequence[np.ndarray] | np.ndarray, domains: Sequence[str] | None = None,
                 weights: Sequence[float] | None = None) -> None:
        """Offer sequences (a list, or a 2-D array of windows) in stream order, with their domains.

        ``weights`` (per item) are for weighted buffers; the others refuse them.
        """
        ...

    def sample(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """``n`` kept sequences, uniformly with replacement, as an ``(n, seq_len)`` array."""
        ...

    def sample_with_lengths(self, n: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like ``sample``, with each sequence's true (unpadded) length."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
