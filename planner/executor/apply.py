"""apply_plan: a residency plan placed on a loaded diffusers pipeline.

The executor reads the plan and the pipeline, nothing else: the plan names each component's
strategy, the layer lists to stream (module paths, run order, K per list), resident layers and
whether modules outside the layers stream. Applying is all or nothing: if any placement fails to
attach, everything attached so far is detached in reverse order and the pipeline is as it was.
"""

from __future__ import annotations

from typing import Any

import torch

from planner.errors import PlanApplyError
from planner.executor.handle import APPLIED_MARK, ResidencyHandle, module_components
from planner.executor.placement import attach_components
from planner.executor.streams import resolve_device
from planner.plan import Plan


def apply_plan(pipe: Any, plan: Plan, *, device: str | torch.device | None = None) -> ResidencyHandle:
    """Apply ``plan`` to ``pipe`` (a diffusers pipeline or a ``{name: module}`` mapping)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"apply_plan takes a Plan, not {type(plan).__name__}; planner.apply_plan also "
                        "takes a spec and plans it against the pipeline")
    dev = resolve_device(device or plan.device)
    modules = module_components(pipe)
    missing = [n for n in plan.components if n not in modules]
    if missing:
        raise PlanApplyError(f"the plan places {', '.join(missing)}, which the pipeline does not have "
                             f"(its module components: {', '.join(modules)})")
    wrong = [f"{n} is a {type(modules[n]).__name__}, the plan was made for a {cp.class_name}"
             for n, cp in plan.components.items() if cp.class_name and type(modules[n]).__name__ != cp.class_name]
    if wrong:
        raise PlanApplyError(f"the plan was made for another pipeline: {'; '.join(wrong)}; re-plan against this one")
    taken = [n for n in plan.components if getattr(modules[n], APPLIED_MARK, None) is not None]
    if taken:
        raise PlanApplyError(f"a plan is already applied to {', '.join(taken)}; remove() it before applying another")
    handle = ResidencyHandle(pipeline=pipe, plan=plan, device=dev)
    try:
        attach_components(handle, lambda name, cp: (modules[name], None))
    except BaseException as exc:
        handle.remove()
        if not isinstance(exc, Exception):
            raise                       # KeyboardInterrupt, SystemExit: undone, then on their way
        what = str(exc) if isinstance(exc, PlanApplyError) else f"{type(exc).__name__}: {exc}"
        raise PlanApplyError(f"applying the plan failed, nothing was changed: {what}") from exc
    return handle
