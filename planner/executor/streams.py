"""CUDA streams and events behind one small interface, with null stand-ins on the CPU, so the engines
run the same code on both devices.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from planner.errors import PlanApplyError


class NullEvent:
    """Stands in for ``torch.cuda.Event`` off CUDA: work is already ordered, so nothing to wait."""

    __slots__ = ()

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class NullStream:
    """Stands in for ``torch.cuda.Stream`` off CUDA."""

    __slots__ = ()

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = NullStream()


class StreamOps:
    """Streams, events and stream contexts for one device (real on CUDA, no-op objects elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"

    def current(self) -> Any:
        return torch.cuda.current_stream(self.device) if self.is_cuda else _NULL_STREAM

    def new_stream(self) -> Any:
        return torch.cuda.Stream(self.device) if self.is_cuda else NullStream()

    def new_event(self) -> Any:
        return torch.cuda.Event() if self.is_cuda else NullEvent()

    def use(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if self.is_cuda else contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


def resolve_device(device: torch.device | str) -> torch.device:
    """``cuda`` without an index means the current CUDA device (streams need a concrete one)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PlanApplyError(f"the plan's device is {dev}, and this torch sees no CUDA device "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}); "
                             "plan for device: cpu, or run where a GPU is")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
