"""residency-planner: declarative residency plans for diffusion pipelines.

Spec side (no torch): ``make_plan``, ``Plan``. Execution side (imports torch when called):
``apply_plan``, ``load_pipeline``.
"""

from __future__ import annotations

from planner.api import apply_plan, load_pipeline, make_plan
from planner.errors import Diagnostic, PlanApplyError, SpecError
from planner.plan import ComponentPlan, Decision, Estimate, Plan, Strategy
from planner.planning.make_plan import load_spec

__all__ = ["make_plan", "load_spec", "apply_plan", "load_pipeline", "Plan", "ComponentPlan", "Decision",
           "Estimate", "Strategy", "SpecError", "PlanApplyError", "Diagnostic"]
__version__ = "0.1.0"
