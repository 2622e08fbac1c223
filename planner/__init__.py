"""residency-planner: declarative residency plans for diffusion pipelines.

Spec side (no torch): ``make_plan``, ``Plan``. Execution side (imports torch lazily):
``apply_plan``, ``load_pipeline``.
"""

from __future__ import annotations

from typing import Any

from planner.errors import Diagnostic, PlanApplyError, SpecError
from planner.plan import ComponentPlan, Decision, Estimate, Plan
from planner.planning.make_plan import load_spec, make_plan

__all__ = ["make_plan", "load_spec", "apply_plan", "load_pipeline", "Plan", "ComponentPlan", "Decision",
           "Estimate", "SpecError", "PlanApplyError", "Diagnostic"]
__version__ = "0.1.0"


def apply_plan(pipe: Any, plan: Any, **kwargs: Any) -> Any:
    """Apply a plan (or a spec) to a loaded diffusers pipeline; returns a handle with report() and remove()."""
    from planner.executor.apply import apply_plan as _apply

    return _apply(pipe, plan, **kwargs)


def load_pipeline(spec: Any, **kwargs: Any) -> Any:
    """Load the spec's diffusers pipeline folder with its plan applied as it loads."""
    from planner.executor.pipeline_loader import load_pipeline as _load

    return _load(spec, **kwargs)
