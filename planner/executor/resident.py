"""The resident strategy: the whole component on the device for the whole run.

Changes it makes, and how ``detach`` undoes each:
- every parameter and buffer moved to the device (``.data`` replaced, the Parameter objects kept):
  moved back to the device it came from;
- for a component built on the meta device, each tensor read from its weight source straight onto
  the device (several threads reading at once, every read done before the first bind) and bound in
  place of the meta tensor: ``detach`` sends it to the CPU, where ``from_pretrained`` would have
  left it; a failed attach puts every meta tensor back.
"""

from __future__ import annotations

from typing import Any

import torch

from planner.executor import packing, weight_sources


class Resident:
    """The whole component on the device; remembers where every tensor was so that detach() puts it back."""

    def __init__(self, module: torch.nn.Module, device: torch.device, source: Any = None, name: str = "") -> None:
        self.module = module
        self.device = device
        self.source = source          # where a module built on meta gets its values (once)
        self.name = name
        self._original: list[tuple[torch.Tensor, torch.device]] = []

    def attach(self) -> None:
        if self.source is not None:
            self._attach_from_source()
            return
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        self._original = [(t, t.device) for t in tensors]
        try:
            for t in tensors:
                if t.device != self.device:
                    t.data = t.data.to(self.device)
        except BaseException:
            self.detach()
            raise

    def _attach_from_source(self) -> None:
        sourced = weight_sources.SourcedTensors(self.module, self.source,
                                                what=self.name or type(self.module).__name__)
        tensors = packing.unique_tensors(self.module)
        lacking = sourced.missing(tensors)
        if lacking:
            raise ValueError(f"{self.name}: the weight source lacks {', '.join(lacking[:5])}")
        before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._original = []
        try:
            with torch.inference_mode(False), torch.no_grad():
                for t, fresh in zip(tensors, sourced.materialize_all(tensors, self.device)):
                    home = packing.home_device(t)
                    before.append((t, t.data))
                    t = sourced.bind(t, fresh) if fresh is not None else sourced.bind(t, t.data.to(self.device))
                    self._original.append((t, home))
        except BaseException:
            for t, data in before:
                t.data = data
            sourced.undo()
            self._original = []
            raise
        self.source = None            # the module holds real tensors now: a later attach moves them

    def detach(self) -> None:
        for t, dev in self._original:
            if t.device != dev:
                t.data = t.data.to(dev)
        self._original = []

    def report(self) -> dict:
        nbytes = sum(t.numel() * t.element_size() for t in list(self.module.parameters()) + list(self.module.buffers()))
        return {"gpu_resident_bytes": nbytes, "host_pinned_bytes": 0}
