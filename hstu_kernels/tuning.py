"""Autotuning results, kept in memory and on disk (one JSON file per tuner and card).

A tuner times its candidates the first time a key is seen on a card and keeps the winner
here; a later process on the same card (and the same library and Triton versions) reads it
back instead of timing again, so that a fresh process's first call does not pay for the
tuning. Location: ``settings.tuning_cache`` (``$HSTU_KERNELS_TUNING_CACHE``; ``0``/``off``: in
memory only). It fills itself as shapes are first met (``python -m hstu_kernels.precompile``
compiles kernels; it tunes only the small shapes it runs).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from hstu_kernels import settings

__all__ = ["TuningCache", "reset_caches"]

_ALL: list[TuningCache] = []


def _versions() -> str:
    from hstu_kernels import __version__

    try:
        from importlib import metadata

        triton = metadata.version("triton")
    except Exception:  # not installed: nothing Triton-tuned is stored anyway
        triton = "none"
    return f"hstu_kernels {__version__}, triton {triton}, torch {torch.__version__}"


@functools.cache
def _card(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


class TuningCache:
    """The winners of one tuner, by card and key. ``encode``/``decode`` turn a value into
    JSON-able data and back (a value that fails to decode is ignored, as if never tuned)."""

    def __init__(
        self,
        name: str,
        *,
        encode: Callable[[Any], Any],
        decode: Callable[[Any], Any],
    ) -> None:
        self.name = name
        self._encode, self._decode = encode, decode
        self._lock = threading.Lock()
        self._memory: dict[tuple[str, tuple], Any] = {}
        self._volatile: set[tuple[str, tuple]] = set()  # kept in memory only
        self._loaded: set[str] = set()
        self._pinned: list[Any] = []  # pin(): the value every key resolves to
        _ALL.append(self)

    def _path(self, card: str) -> Path | None:
        folder = settings.get().tuning_cache
        return None if folder is None else folder / f"{self.name}-{card}.json"

    def _load(self, card: str) -> None:
        if card in self._loaded:
            return
        self._loaded.add(card)
        path = self._path(card)
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # unreadable: tune again and overwrite it
        if data.get("versions") != _versions():
            return
        for entry in data.get("entries", []):
            try:
                key = _as_key(entry["key"])
                self._memory.setdefault((card, key), self._decode(entry["value"]))
            except (KeyError, TypeError, ValueError):
                continue

    def get(self, device: torch.device, key: tuple) -> Any:
        """The value tuned for ``key`` on ``device``'s card, or ``None`` (inside
        :meth:`pin`: the pinned value)."""
        card = _card(device)
        with self._lock:
            self._load(card)
            if self._pinned:
                self._memory.setdefault((card, key), self._pinned[-1])
                self._volatile.add((card, key))
            return self._memory.get((card, key))

    @contextlib.contextmanager
    def pin(self, value: Any) -> Iterator[None]:
        """Within the block every key not tuned yet resolves to ``value`` without timing (kept
        in memory, visible in :meth:`items`, never written to disk); afterwards the keys it
        resolved are forgotten. For tests and experiments that need one tuner's choice
        fixed."""
        with self._lock:
            before = set(self._memory)
            self._pinned.append(value)
        try:
            yield
        finally:
            with self._lock:
                self._pinned.pop()
                for k in set(self._memory) - before:
                    del self._memory[k]
                    self._volatile.discard(k)

    def put(self, device: torch.device, key: tuple, value: Any, *, persist: bool = True) -> None:
        """Remember ``value`` for ``key`` on ``device``'s card (and write the card's file);
        ``persist=False`` keeps it in this process only (a fallback after a failure, which a
        later process should not inherit)."""
        card = _card(device)
        with self._lock:
            self._load(card)
            self._memory[(card, key)] = value
            if not persist:
                self._volatile.add((card, key))
                return
            self._volatile.discard((card, key))
            path = self._path(card)
            if path is None:
                return
            entries = [
                {"key": list(k), "value": self._encode(v)}
                for (c, k), v in self._memory.items()
                if c == card and (c, k) not in self._volatile
            ]
            data = {"versions": _versions(), "entries": entries}
            with contextlib.suppress(OSError):  # a read-only home: memory only
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                os.replace(tmp, path)

    def items(self) -> dict[tuple, Any]:
        """The values known in this process, by key (all cards; a copy)."""
        with self._lock:
            return {k: v for (_, k), v in self._memory.items()}

    def clear(self) -> None:
        """Forget what is in memory (the disk file stays, and is read again on next use)."""
        with self._lock:
            self._memory.clear()
            self._volatile.clear()
            self._loaded.clear()


def _as_key(raw: Any) -> tuple:
    return tuple(_as_key(x) if isinstance(x, list) else x for x in raw)


def reset_caches() -> None:
    """Forget every tuner's choices held in memory (files on disk stay)."""
    for cache in _ALL:
        cache.clear()


settings.on_change(reset_caches)  # the tuning folder may have moved
