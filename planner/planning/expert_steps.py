"""Which denoiser runs each step: a pipeline with two experts splits its steps at a boundary.

Wan 2.2 A14B (``WanPipeline`` with ``transformer_2`` and ``boundary_ratio`` in its ``model_index.json``)
runs ``transformer`` (the high-noise expert) on the steps whose timestep is at least
``boundary_ratio * num_train_timesteps`` and ``transformer_2`` on the rest: each step calls one
expert, not both. How many steps fall on each side depends on the scheduler's timesteps, which the
pipeline's scheduler config fixes; they are worked out here as diffusers' schedulers compute them
(``UniPCMultistepScheduler`` with ``use_flow_sigmas``, the Wan default, and
``FlowMatchEulerDiscreteScheduler``), without numpy or torch (the spec side stays light).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FIRST_EXPERT, SECOND_EXPERT = "transformer", "transformer_2"


def _linspace(start: float, stop: float, n: int) -> list[float]:
    if n == 1:
        return [start]
    step = (stop - start) / (n - 1)
    return [start + i * step for i in range(n)]


def _shifted(sigma: float, shift: float) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_timesteps(schedule: Mapping[str, Any], steps: int) -> list[float]:
    """The ``steps`` timesteps a flow-matching scheduler with this config runs, highest first.

    ``use_flow_sigmas`` (UniPC's ``set_timesteps``): sigmas ``linspace(1, 1/N, steps + 1)`` without the
    last, shifted by ``flow_shift``, the first nudged below 1, times N, truncated to integers as the
    scheduler stores them. Otherwise (flow-match Euler without dynamic shifting): from N down to
    N times its smallest shifted sigma (``shift``-shifted 1/N), ``steps`` of them, each shifted again.
    """
    n_train = float(schedule.get("num_train_timesteps") or 1000)
    steps = max(int(steps), 1)
    if schedule.get("use_flow_sigmas"):
        shift = float(schedule.get("flow_shift") or 1.0)
        shifted = [_shifted(s, shift) for s in _linspace(1.0, 1.0 / n_train, steps + 1)[:-1]]
        if abs(shifted[0] - 1.0) < 1e-6:
            shifted[0] -= 1e-6
        return [float(int(s * n_train)) for s in shifted]
    shift = float(schedule.get("shift") or 1.0)
    lowest = _shifted(1.0 / n_train, shift) * n_train
    return [_shifted(t / n_train, shift) * n_train for t in _linspace(n_train, lowest, steps)]


def expert_step_shares(names: Sequence[str], schedule: Mapping[str, Any], steps: int) -> dict[str, float]:
    """Each denoiser's share of the steps: 1 for all, except two experts split at the boundary."""
    shares = {name: 1.0 for name in names}
    boundary = schedule.get("boundary_ratio")
    if not boundary or FIRST_EXPERT not in shares or SECOND_EXPERT not in shares:
        return shares
    n_train = float(schedule.get("num_train_timesteps") or 1000)
    timesteps = flow_timesteps(schedule, steps)
    high = sum(1 for t in timesteps if t >= float(boundary) * n_train) / len(timesteps)
    shares[FIRST_EXPERT], shares[SECOND_EXPERT] = high, 1.0 - high
    return shares
