"""Synthetic ranking requests for the end-to-end benchmark (the seed's data set).

Each user has one history of ``max_history`` interactions (item id, action id), drawn once
from a seeded generator. Request ``i`` of a user reveals the first
``start + i * step`` interactions of that history and asks to rank ``targets`` fresh
candidate items, so consecutive requests of a user share all but ``step`` history tokens:
with a KV cache, request ``i`` finds ``start + (i-1) * step`` of them cached.

A *case* is one batch size ``B``: users ``0..B-1`` travel together, and batch ``i`` holds
request ``i`` of each of them. With the seed's numbers (history 256 to 4096 in steps of 256,
256 candidates) a case has 16 batches. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["RequestBatch", "SyntheticRequests", "UserRequest"]


@dataclass(frozen=True)
class UserRequest:
    """One user's ranking request.

    ``history_items``/``history_actions`` hold the user's whole history so far (``H`` tokens,
    int64, on the CPU); the last ``new`` of them arrived since the user's previous request.
    ``candidates`` are the ``T`` items to score (int64).
    """

    user_id: int
    history_items: torch.Tensor
    history_actions: torch.Tensor
    candidates: torch.Tensor
    new: int

    @property
    def history(self) -> int:
        return int(self.history_items.shape[0])

    @property
    def targets(self) -> int:
        return int(self.candidates.shape[0])


@dataclass(frozen=True)
class RequestBatch:
    """The requests of one batch (one per user), in user order."""

    index: int
    requests: tuple[UserRequest, ...]

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def user_ids(self) -> list[int]:
        return [r.user_id for r in self.requests]

    @property
    def histories(self) -> list[int]:
        return [r.history for r in self.requests]

    @property
    def targets(self) -> list[int]:
        return [r.targets for r in self.requests]

    @property
    def new(self) -> list[int]:
        return [r.new for r in self.requests]


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


class SyntheticRequests:
    """Seeded generator of growing-history ranking requests.

    Args:
        num_items: item vocabulary size (ids ``0..num_items-1``).
        num_actions: action vocabulary size (ids ``0..num_actions-1``).
        start, stop, step: history length of the first request, the last, and the growth per
            request (``stop - start`` must be a multiple of ``step``). Seed: 256, 4096, 256.
        targets: candidates per request (seed: 256).
        seed: every id drawn depends only on ``seed``, the user and the request index.
    """

    def __init__(
        self,
        *,
        num_items: int,
        num_actions: int,
        start: int = 256,
        stop: int = 4096,
        step: int = 256,
        targets: int = 256,
        seed: int = 0,
    ) -> None:
        self.num_items = _check_int("num_items", num_items, 1)
        self.num_actions = _check_int("num_actions", num_actions, 1)
        self.start = _check_int("start", start, 1)
        self.step = _check_int("step", step, 1)
        self.stop = _check_int("stop", stop, start)
        if (stop - start) % step:
            raise ValueError(f"stop: expected start + a multiple of step ({step}), got {stop}")
        self.targets = _check_int("targets", targets, 0)
        self.seed = _check_int("seed", seed, 0)

    @property
    def num_requests(self) -> int:
        """Requests per user (= batches per case): 16 with the seed's numbers."""
        return (self.stop - self.start) // self.step + 1

    def history_length(self, request: int) -> int:
        """History length ``H`` of request ``request`` (0-based)."""
        if not 0 <= request < self.num_requests:
            raise ValueError(f"request: expected 0..{self.num_requests - 1}, got {request}")
        return self.start + request * self.step

    def _generator(self, user: int, stream: int) -> torch.Generator:
        # One independent stream per (seed, user, purpose): a user's history does not depend
        # on which other users share its batch, nor on how many requests were drawn before.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + user) * 1_000_033 + stream)

    def user_history(self, user: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The full ``stop``-token history of ``user``: (items, actions), int64."""
        _check_int("user", user, 0)
        gen = self._generator(user, 0)
        items = torch.randint(self.num_items, (self.stop,), generator=gen)
        actions = torch.randint(self.num_actions, (self.stop,), generator=gen)
        return items, actions

    def request(self, user: int, request: int) -> UserRequest:
        """Request ``request`` (0-based) of ``user``."""
        self.history_length(request)  # checks the index
        return self._make(user, request, *self.user_history(user))

    def _make(
        self, user: int, request: int, items: torch.Tensor, actions: torch.Tensor
    ) -> UserRequest:
        h = self.history_length(request)
        gen = self._generator(user, 1 + request)
        candidates = torch.randint(self.num_items, (self.targets,), generator=gen)
        new = h if request == 0 else self.step
        return UserRequest(user, items[:h], actions[:h], candidates, new)

    def case(self, batch_size: int, users: Sequence[int] | None = None) -> Iterator[RequestBatch]:
        """The batches of one case: batch ``i`` is request ``i`` of each user.

        ``users`` defaults to ``0..batch_size-1``.
        """
        _check_int("batch_size", batch_size, 1)
        users = list(range(batch_size)) if users is None else list(users)
        if len(users) != batch_size:
            raise ValueError(f"users: expected {batch_size} user ids, got {len(users)}")
        histories = {u: self.user_history(u) for u in users}
        for i in range(self.num_requests):
            yield RequestBatch(i, tuple(self._make(u, i, *histories[u]) for u in users))
