"""Denoising step times of one generation, as the pipeline ran them.

A pipeline whose ``__call__`` takes ``callback_on_step_end`` (an explicit parameter, not one
``**kwargs`` would swallow) is timed by it: a step ends at its callback, the first one starts at the
denoiser's first forward (so text encoding is not a step). Otherwise the denoiser's forward is timed
through forward hooks: its calls are grouped into the steps that ran (the pipeline's
``_num_timesteps``, else the steps asked for) when they divide evenly (CFG runs two or three calls a
step), else each call is reported on its own. On CUDA each mark waits for the device.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

DENOISER_PREFIXES = ("transformer", "unet", "prior", "decoder", "dit")


def denoisers(pipe: Any) -> list[Any]:
    """The components the denoising loop calls (transformer, transformer_2, unet, ...)."""
    import torch

    out = []
    for name, module in (getattr(pipe, "components", {}) or {}).items():
        if isinstance(module, torch.nn.Module) and name.startswith(DENOISER_PREFIXES):
            out.append(module)
    return out


class StepTimer:
    def __init__(self, pipe: Any, device: Any, *, use_callback: bool) -> None:
        self.pipe = pipe
        self.device = device
        self.use_callback = use_callback
        self.forwards: list[list[float]] = []        # [start, end] per denoiser call
        self.callbacks: list[float] = []
        self.started = 0.0
        self.finished = 0.0
        self._handles: list[Any] = []
        self._depth = 0

    def _now(self) -> float:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _pre(self, module: Any, args: Any) -> None:
        self._depth += 1
        if self._depth == 1:
            self.forwards.append([self._now(), float("nan")])

    def _post(self, module: Any, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self.forwards:
            self.forwards[-1][1] = self._now()

    def callback(self, pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.callbacks.append(self._now())
        return kwargs

    def __enter__(self) -> "StepTimer":
        for module in denoisers(self.pipe):
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post))
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finished = time.perf_counter()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def steps(self, asked: int | None) -> tuple[list[float], str]:
        """(seconds per step, what they were measured from)."""
        if self.use_callback and self.callbacks:
            first = self.forwards[0][0] if self.forwards else self.started
            marks = [first, *self.callbacks]
            return [b - a for a, b in zip(marks, marks[1:])], "the pipeline's callback_on_step_end"
        calls = [f for f in self.forwards if f[1] == f[1]]
        if not calls:
            return [], "no denoiser call seen"
        ran = getattr(self.pipe, "_num_timesteps", None)
        n = ran if isinstance(ran, int) and ran > 0 else asked
        if n and len(calls) % n == 0:
            per = len(calls) // n
            starts = [calls[i * per][0] for i in range(n)] + [calls[-1][1]]
            what = "the denoiser's forward" + (f" ({per} calls a step)" if per > 1 else "")
            return [b - a for a, b in zip(starts, starts[1:])], what
        return [end - start for start, end in calls], "the denoiser's forward (one entry per call)"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
