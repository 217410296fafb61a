"""Copies of whole users' pages between the device pool and a host pool.

On CUDA, offload (device -> pinned host) and onload (host -> device) run on their own streams
and never block the host. Per-layer events let layer ``l``'s compute wait only for layer
``l``'s pages: ``layer_ready[l]`` is recorded on the onload stream after layer ``l``'s onload
*and* after every offload of layer ``l`` issued so far (an offloaded page may be handed to
another user, whose onload or append must not write it before it has been read). The events are created
with ``external=True`` so that a CUDA graph that waits on them records real event-wait nodes.

On the CPU the same copies run synchronously, so the bookkeeping is testable without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hstu_kernels.kvcache.allocator import page_runs

__all__ = ["TransferEngine"]


class TransferEngine:
    """Issues page copies between the device pools and the host pools of ``planes``: pairs
    ``(device_pool, host_pool)`` indexed ``[num_layers, pages, ...]`` alike (the K/V pages
    ``[..., 2, page_size, heads, D]``, and an FP8 pool's scales ``[..., 2, page_size,
    heads]``), whose pages are always copied together."""

    def __init__(self, planes: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self.planes = [(d, h) for d, h in planes]
        device_pool, host_pool = self.planes[0]
        self.device_pool = device_pool
        self.host_pool = host_pool
        self.num_layers = device_pool.shape[0]
        self.cuda = device_pool.device.type == "cuda"
        self.external_events = False  # waits can be captured into CUDA graphs
        if self.cuda:
            dev = device_pool.device
            self.offload_stream = torch.cuda.Stream(dev)
            self.onload_stream = torch.cuda.Stream(dev)
            self.offload_done = [torch.cuda.Event() for _ in range(self.num_layers)]
            try:
                self.layer_ready = [torch.cuda.Event(external=True) for _ in range(self.num_layers)]
                self.external_events = True
            except TypeError:  # an older torch: graphs must wait outside the replay
                self.layer_ready = [torch.cuda.Event() for _ in range(self.num_layers)]
                self.external_events = False
            self.onload_done = torch.cuda.Event()
            # torch creates a CUDA event on its first record; a wait on an uncreated event is
            # skipped, which would leave a graph captured now without its wait nodes.
            cur = torch.cuda.current_stream(dev)
            for e in [*self.offload_done, *self.layer_ready, self.onload_done]:
                e.record(cur)

    def _index(self, pages: Sequence[int]) -> torch.Tensor:
        host = torch.tensor(list(pages), dtype=torch.long, pin_memory=self.cuda)
        return host.to(self.device_pool.device, non_blocking=True)

    def transfer(
        self,
        offloads: Sequence[tuple[Sequence[int], Sequence[int]]],
        onloads: Sequence[tuple[Sequence[int], Sequence[int]]],
    ) -> None:
        """Copy ``offloads`` (device pages -> host pages) then ``onloads`` (host pages ->
        device pages), layer by layer. Lists of pairs of equally long page lists."""
        off_dev = [p for d, _ in offloads for p in d]
        off_host = [p for _, h in offloads for p in h]
        on_host = [p for h, _ in onloads for p in h]
        on_dev = [p for _, d in onloads for p in d]
        if not off_dev and not on_dev:
            return
        if (off_dev or on_dev) and self.host_pool is None:
            raise RuntimeError("transfer: no host pool")
        if not self.cuda:
            self._copy_sync(off_dev, off_host, on_host, on_dev)
            return
        cur = torch.cuda.current_stream(self.device_pool.device)
        if off_dev:
            with torch.cuda.stream(self.offload_stream):
                # Finish the compute that wrote these pages, and the onloads that read host
                # pages we may now overwrite.
                self.offload_stream.wait_stream(cur)
                self.offload_stream.wait_event(self.onload_done)
                idx = self._index(off_dev)
                runs = page_runs(list(range(len(off_host))), off_host)
                for layer in range(self.num_layers):
                    for device_pool, host_pool in self.planes:
                        staging = device_pool[layer].index_select(0, idx)
                        for s, d, n in runs:
                            host_pool[layer, d : d + n].copy_(staging[s : s + n], non_blocking=True)
                    self.offload_done[layer].record(self.offload_stream)
        with torch.cuda.stream(self.onload_stream):
            self.onload_stream.wait_stream(cur)
            if on_dev:
                idx = self._index(on_dev)
                runs = page_runs(list(range(len(on_host))), on_host)
            for layer in range(self.num_layers):
                # Always: a page freed by an earlier call's offload may be written now.
                self.onload_stream.wait_event(self.offload_done[layer])
                for device_pool, host_pool in self.planes if on_dev else ():
                    staging = torch.empty(
                        (len(on_dev), *device_pool.shape[2:]),
                        dtype=device_pool.dtype,
                        device=device_pool.device,
                    )
                    for s, h, n in runs:
                        staging[s : s + n].copy_(host_pool[layer, h : h + n], non_blocking=True)
                    device_pool[layer].index_copy_(0, idx, staging)
                self.layer_ready[layer].record(self.onload_stream)
            self.onload_done.record(self.onload_stream)

    def _copy_sync(
        self, off_dev: list[int], off_host: list[int], on_host: list[int], on_dev: list[int]
    ) -> None:
        for device_pool, host_pool in self.planes:
            if off_dev:
                host_pool[:, off_host] = device_pool[:, off_dev].to(host_pool.device)
            if on_dev:
                device_pool[:, on_dev] = host_pool[:, on_host].to(device_pool.device)

    def pending(self) -> bool:
        """Whether an issued copy may still be running. ``onload_done`` is recorded after
        every layer's ``layer_ready`` of the latest transfer, and each transfer's onload
        stream first waits for its offloads and for everything issued before it, so once
        ``onload_done`` has completed, every ``layer_ready`` has too."""
        return self.cuda and not self.onload_done.query()

    def wait_layer(self, layer: int) -> None:
        """Make the current stream wait until layer ``layer``'s pages are in place."""
        if self.cuda:
            torch.cuda.current_stream(self.device_pool.device).wait_event(self.layer_ready[layer])

    def synchronize(self) -> None:
        """Block the host until every issued copy has finished."""
        if self.cuda:
            self.offload_stream.synchronize()
            self.onload_stream.synchronize()
