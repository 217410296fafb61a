"""Embedding lookup for the ranking model, behind a small interface.

The model asks for embeddings of named sparse features (``"item"``, ``"action"``) given flat
id tensors, and gets back one ``[n, dim]`` tensor per feature, rows in the order of the ids.
:class:`TorchEmbeddings` serves that with plain ``torch.nn.Embedding`` tables.

Dropping in a TorchRec ``EmbeddingCollection`` (or a dynamic embedding) means writing another
class with the same two members: ``dims`` and ``__call__``. Such an adapter packs the ids into
a ``KeyedJaggedTensor`` (``KeyedJaggedTensor.from_lengths_sync(keys, values, lengths)``, one
length per feature here since the ids are already flat), calls the collection, and returns
``{name: result[name].values()}``. It is not written here because TorchRec is not a
dependency of this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["EmbeddingLookup", "TorchEmbeddings"]


@runtime_checkable
class EmbeddingLookup(Protocol):
    """What the ranking model needs from its embedding tables."""

    @property
    def dims(self) -> Mapping[str, int]:
        """Embedding width of each feature the lookup serves."""
        ...

    def __call__(self, ids: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{feature: int64 ids [n]}`` -> ``{feature: embeddings [n, dims[feature]]}``."""
        ...


class TorchEmbeddings(nn.Module):
    """One ``nn.Embedding`` table per feature.

    Args:
        tables: ``{feature: (num_embeddings, dim)}``.
        dtype, device: of the tables.
        init_std: tables are drawn from ``N(0, init_std^2)`` (random, never zeros, so the
            benchmark moves real data).
        seed: for the tables' initial values.
    """

    def __init__(
        self,
        tables: Mapping[str, tuple[int, int]],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        init_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError("tables: expected at least one feature")
        gen = torch.Generator(device=device).manual_seed(seed)
        self.tables = nn.ModuleDict()
        for name, (rows, dim) in tables.items():
            if rows < 1 or dim < 1:
                raise ValueError(f"tables[{name!r}]: expected positive sizes, got {(rows, dim)}")
            table = nn.Embedding(rows, dim, dtype=dtype, device=device)
            with torch.no_grad():
                table.weight.normal_(0.0, init_std, generator=gen)
            self.tables[name] = table

    @property
    def dims(self) -> dict[str, int]:
        return {name: t.embedding_dim for name, t in self.tables.items()}

    def forward(self, ids: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unknown = set(ids) - set(self.tables)
        if unknown:
            raise ValueError(
                f"ids: unknown features {sorted(unknown)} (have {sorted(self.tables)})"
            )
        out = {}
        for name, x in ids.items():
            if x.dtype not in (torch.int32, torch.int64) or x.dim() != 1:
                raise TypeError(
                    f"ids[{name!r}]: expected a 1-d int tensor, got {x.dtype} {x.shape}"
                )
            out[name] = self.tables[name](x)
        return out
