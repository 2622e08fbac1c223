"""The Python API: the one place where planning and execution meet.

``make_plan`` plans a spec (against its ``pipeline:`` section, a loaded pipeline or an inventory);
``apply_plan`` places a plan (or a spec, planned against the pipeline first) on a loaded pipeline;
``load_pipeline`` loads a spec's folder with its plan applied as it loads. The executor is imported
when one of the last two runs, so planning never loads torch.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from planner.errors import Diagnostic, FolderError, PlanApplyError, SpecError
from planner.files.bounded_read import plain_relative
from planner.files.host_ram import host_ram_bytes
from planner.files.model_folder import component_weight_files
from planner.files.readahead import start_readahead
from planner.inventory.model import Inventory
from planner.plan import FILE_TIERS, Plan
from planner.planning import make_plan as _planning
from planner.planning.make_plan import SpecLike, load_spec
from planner.planning.workload import uncounted_denoisers
from planner.spec.sizes import parse_size


HOST_RAM_ENV = "RESIDENCY_PLANNER_HOST_RAM"


def make_plan(spec: SpecLike, pipeline: Any = None, *, strict: bool = False,
              inventory: Inventory | None = None, machine_ram: int | None = None, count: bool = True) -> Plan:
    """Load, validate and resolve a deployment spec into a residency plan.

    ``pipeline`` (a loaded diffusers pipeline, or a ``{name: module}`` mapping) or ``inventory``
    replace the facts the spec's ``pipeline:`` section would give. ``machine_ram``: the RAM of the
    machine the plan is for (``this_machine_ram()``), the host tiers' limit where the spec sets no
    ``memory.host_budget`` or ``memory.host_ram``. ``count``: a folder's denoiser whose config the shipped
    counts lack is counted on the meta device first (needs torch and diffusers; a few seconds for a
    real-size one), else priced by the rule of thumb.
    """
    doc = load_spec(spec)
    counts = None
    if count and pipeline is None and inventory is None and "path" in doc.data["pipeline"]:
        inventory = _planning.spec_inventory(doc)
        counts = _folder_counts(doc, inventory)
    return _planning.make_plan(doc, pipeline, strict=strict, inventory=inventory, machine_ram=machine_ram,
                               counts=counts)


def _folder_counts(doc: Any, inventory: Inventory) -> dict[str, list[Any]] | None:
    """Counts for the folder's denoisers the shipped data lacks, where torch and diffusers are
    installed (nothing is imported when every denoiser is counted); None where they are not, or the
    count fails (the rule of thumb prices them then)."""
    if not uncounted_denoisers(inventory) or not all(importlib.util.find_spec(m) for m in ("torch", "diffusers")):
        return None
    from planner.costs.folder_counts import count_folder   # torch: only for a config to count

    try:
        return count_folder(_planning.spec_folder(doc), inventory)
    except Exception:  # noqa: BLE001 - a config the meta build cannot take: the rule of thumb stands
        return None


def files_read_whole(folder: Path, plan: Plan) -> list[Path]:
    """The safetensors files ``load_pipeline`` reads whole, in the plan's order: every component's but
    those a file tier streams from (their layers stay in the files until they run)."""
    out: list[Path] = []
    for name, cp in plan.components.items():
        if cp.host_tier in FILE_TIERS or not plain_relative(name) or "/" in name:
            continue
        try:
            out += component_weight_files(folder / name)
        except FolderError:
            continue            # the loader reports it
    return out


def this_machine_ram() -> int | None:
    """The RAM of this machine as a plan loaded here may count on it: ``RESIDENCY_PLANNER_HOST_RAM``
    (a size; empty: none), else ``MemTotal`` capped by the cgroup's memory limit."""
    if HOST_RAM_ENV in os.environ:
        value = os.environ[HOST_RAM_ENV].strip()
        try:
            return parse_size(value) if value else None
        except ValueError:
            raise SpecError([Diagnostic(f"<environment {HOST_RAM_ENV}>", 1, 1,
                                        f"{HOST_RAM_ENV}={value!r} is not a size (use bytes or a unit: "
                                        "B, KB, MB, GB, KiB, MiB, GiB)")]) from None
    return host_ram_bytes()


def apply_plan(pipe: Any, plan: Plan | SpecLike, *, device: str | None = None, strict: bool = False) -> Any:
    """Apply a plan, or a spec planned against ``pipe``, to a loaded pipeline; all or nothing.

    Returns a handle with ``report()``, ``remove()`` and ``paused()``.
    """
    from planner.executor.apply import apply_plan as _apply

    if not isinstance(plan, Plan):
        plan = make_plan(plan, pipeline=pipe, strict=strict)
    return _apply(pipe, plan, device=device)


def spec_folder(spec: SpecLike) -> Path:
    """The diffusers folder a spec's ``pipeline.path`` names: a folder relative to the spec's file,
    or a Hugging Face repo id (``ORG/NAME``) found in the local hub cache, offline."""
    doc = load_spec(spec)
    section = doc.data["pipeline"]
    if "path" not in section:
        raise PlanApplyError("loading needs pipeline.path (a diffusers folder); catalog entries and class "
                             "lists carry no weights")
    try:
        return _planning.spec_folder(doc)
    except FolderError as exc:
        raise SpecError([doc.diagnostic(("pipeline", "path"), str(exc))]) from None


def load_pipeline(spec: SpecLike, *, device: str | None = None, plan: Plan | None = None,
                  progress: bool = True, pipeline_kwargs: dict[str, Any] | None = None) -> Any:
    """Load ``pipeline.path`` of ``spec`` with its plan (``plan``, else planned from the spec) applied
    as it loads. Returns the pipeline; ``pipe.residency`` is the handle (``report()``, ``remove()``,
    ``load_seconds``, ``load_report``). A component with a storage dtype is read straight into its
    stored form (float8 host blocks, slots or device copy), upcast on the device as it runs; a folder
    whose files store float8 is planned to keep it (docs/loading.md). Errors: ``SpecError`` (the spec, a plan over
    ``memory.host_budget``), ``PlanApplyError`` (files missing or corrupt, a component that cannot
    be placed); on error nothing stays attached."""
    doc = load_spec(spec)
    folder = spec_folder(doc)
    # planned for this machine: where the spec gives no host limit, the host tiers fit its RAM
    plan = plan or make_plan(doc, machine_ram=this_machine_ram())
    start_readahead(files_read_whole(folder, plan))     # the disk works while torch and diffusers import
    from planner.executor.pipeline_loader import load_planned

    return load_planned(folder, plan, device=device, progress=progress, pipeline_kwargs=pipeline_kwargs)
