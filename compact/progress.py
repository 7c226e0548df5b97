"""Progress bars: tqdm shown on a terminal by default (progress None), always (True) or never (False)."""
from __future__ import annotations

from tqdm.auto import tqdm


def bar(iterable=None, *, progress: bool | None, **kwargs) -> tqdm:
    """A tqdm bar over `iterable` (or a manual one), as `progress` says."""
    return tqdm(iterable, disable=None if progress is None else not progress, **kwargs)
