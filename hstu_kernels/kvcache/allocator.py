"""Page allocator: a free list of page ids with double-free and leak checks."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

__all__ = ["OutOfPagesError", "PageAllocator"]


class OutOfPagesError(RuntimeError):
    """Not enough free pages for an allocation."""


class PageAllocator:
    """Hands out page ids ``0 .. num_pages-1`` minus ``reserved``, lowest ids first.

    Lowest-first keeps a user's pages mostly consecutive, so copies between pools coalesce into
    few large runs. Freeing a page that is not allocated (a double free) is an error.
    """

    def __init__(self, num_pages: int, reserved: Iterable[int] = ()) -> None:
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages: expected a positive int, got {num_pages!r}")
        self.num_pages = num_pages
        self.reserved = frozenset(reserved)
        bad = [p for p in self.reserved if not 0 <= p < num_pages]
        if bad:
            raise ValueError(f"reserved: page {bad[0]} not in 0..{num_pages - 1}")
        self._free = [p for p in range(num_pages) if p not in self.reserved]
        heapq.heapify(self._free)
        self._free_set = set(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can ever be allocated (all but the reserved ones)."""
        return self.num_pages - len(self.reserved)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` free page ids (ascending); raises :class:`OutOfPagesError` if fewer are free."""
        if n < 0:
            raise ValueError(f"n: expected >= 0, got {n}")
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        pages = [heapq.heappop(self._free) for _ in range(n)]
        self._free_set.difference_update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return pages to the free list; every page must be allocated, and listed once."""
        pages = list(pages)
        if len(set(pages)) != len(pages):
            raise ValueError("free: a page is listed twice")
        for p in pages:
            if p in self._free_set or p in self.reserved or not 0 <= p < self.num_pages:
                raise ValueError(f"free: page {p} is not allocated (double free?)")
        for p in pages:
            heapq.heappush(self._free, p)
            self._free_set.add(p)

    def is_free(self, page: int) -> bool:
        return page in self._free_set

    def reset(self, owned: Iterable[int]) -> None:
        """Make exactly the pages not in ``owned`` (and not reserved) free: the allocator's
        state derived from who owns what (a cache manager rolling back uses it)."""
        owned = set(owned)
        bad = [p for p in owned if p in self.reserved or not 0 <= p < self.num_pages]
        if bad:
            raise ValueError(f"owned: page {bad[0]} is reserved or not in 0..{self.num_pages - 1}")
        self._free = [p for p in range(self.num_pages) if p not in self.reserved and p not in owned]
        heapq.heapify(self._free)
        self._free_set = set(self._free)


def page_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Split a page-to-page copy into runs ``(src_start, dst_start, length)`` that are
    consecutive on both sides, so each run is one contiguous copy."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            s0, d0, n = runs[-1]
            runs[-1] = (s0, d0, n + 1)
        else:
            runs.append((s, d, 1))
    return runs
