"""A component whose files store its cast weights in float8 keeps them in float8: the files' dtype
becomes its storage dtype, computed in the pipeline's.

``from_pretrained(torch_dtype=bfloat16)`` widens every floating tensor of a float8 checkpoint to
bfloat16 on the host (twice the bytes to hold and to stream). A plan for such a folder instead
records ``storage`` with the files' float8 dtype (diffusers' layerwise casting: the cast modules
keep their float8 bytes and are upcast just before each runs), and the loader reads those bytes
straight into their float8 place. The outputs are the same: a float8 value is exact in every
compute dtype, and the modules that are not cast are widened as ``from_pretrained`` widens them.

The files decide only when casting cannot change a value: every tensor that the cast would store in
float8 is float8 in the files, in one float8 dtype. Read from the safetensors headers (names,
dtypes, shapes; never the data): a cast module is taken to be a module with a weight of two or more
dimensions (Linear, Conv, Embedding) outside every skip pattern of the component (diffusers',
peft's, its class's, the spec's; matched against the module's path and its ancestors', as the
executor's walk does), with every tensor of that module (a bias too). A component whose files mix
float8 and wider tensors there is widened as ``from_pretrained`` does, with a warning naming one.

The spec has the last word: a ``storage_dtype`` of the component's entry or of ``defaults`` (``none``
included: widened, as ``from_pretrained`` does) is left as the resolver made it. A sharded (fsdp)
component is loaded by ``from_pretrained`` and widened, with a warning; so is a streamed one the spec
asks a file host tier (mapped, disk) for, which the host-tier stage keeps to weights without a
storage dtype (the loader itself streams a float8 folder's bytes under those tiers as they are).
Spec side: no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from planner.errors import FolderError
from planner.files import model_folder, safetensors_header
from planner.inventory.model import Inventory
from planner.plan import FILE_TIERS, STORAGE_DTYPES, Decision
from planner.planning.host_tiers import requested_tier
from planner.planning.resolve import ComponentResolution, Resolution
from planner.planning.rules import CAST_ADAPTER_SKIP, cast_skip_patterns
from planner.spec.document import Document

_FLOAT8 = {code: name for code, (name, _) in safetensors_header.SAFETENSORS_DTYPES.items() if name in STORAGE_DTYPES}


def _sets_storage(entry: Any, defaults: Mapping[str, Any]) -> bool:
    return (isinstance(entry, Mapping) and "storage_dtype" in entry) or "storage_dtype" in defaults


def _kept(path: str, patterns: list[re.Pattern[str]]) -> bool:
    """Whether the module at ``path`` or one of its ancestors matches a skip pattern."""
    parts = path.split(".")
    return any(p.search(".".join(parts[:i])) for i in range(1, len(parts) + 1) for p in patterns)


def cast_tensor_dtypes(header: Mapping[str, Mapping[str, Any]], skip: tuple[str, ...]) -> dict[str, str]:
    """The tensors the cast would store in float8, by name, with their safetensors dtype codes."""
    patterns = [re.compile(p) for p in skip]
    modules = {name.rpartition(".")[0] for name, info in header.items()
               if name.endswith(".weight") and len(info.get("shape", ())) >= 2}
    cast = {m for m in modules if m and not _kept(m, patterns)}
    out: dict[str, str] = {}
    for name, info in header.items():
        owner = name.rpartition(".")[0]
        if owner in cast and str(info.get("dtype", "")).startswith(("F", "BF")):
            out[name] = str(info["dtype"])
    return out


def files_storage(folder: Path, comp: ComponentResolution) -> tuple[str | None, str]:
    """(the float8 dtype the files store the component's cast weights in, or None; why not)."""
    try:
        files = model_folder.component_weight_files(folder)
        header: dict[str, Any] = {}
        for file in files:
            for name, info in safetensors_header.read_safetensors_header(file).items():
                header.setdefault(name, info)
    except (FolderError, OSError):
        return None, ""
    if not any(str(info.get("dtype")) in _FLOAT8 for info in header.values()):
        return None, ""
    cast = cast_tensor_dtypes(header, cast_skip_patterns(comp.info.class_name, comp.skip_modules))
    codes = set(cast.values())
    if len(codes) == 1 and next(iter(codes)) in _FLOAT8:
        return _FLOAT8[next(iter(codes))], ""
    wide = sorted(n for n, c in cast.items() if c not in _FLOAT8)
    example = f" ({wide[0]} is {cast[wide[0]]})" if wide else ""
    return None, (f"{comp.name}'s files store some weights in float8, but not every weight a storage dtype would "
                  f"cast{example}: it is widened to {comp.compute_dtype} as from_pretrained does; set "
                  "storage_dtype to keep float8 (the wider weights rounded to it)")


def storage_from_files(doc: Document, inventory: Inventory, resolution: Resolution) -> None:
    """Gives each component of a folder whose files store its cast weights in float8 (and whose spec
    says nothing of storage_dtype) that dtype as its storage dtype, with a decision (rule
    ``storage-dtype``) saying so; warns where the files hold float8 that cannot be kept."""
    if not inventory.source.startswith("path:"):
        return
    root = Path(inventory.source[len("path:"):])
    spec = doc.data
    defaults = spec.get("defaults", {}) or {}
    entries = spec.get("components", {}) or {}
    for comp in resolution.components.values():
        if comp.storage_dtype or _sets_storage(entries.get(comp.name), defaults):
            continue
        stored, why_not = files_storage(root / comp.name, comp)
        if why_not:
            resolution.warnings.append(doc.diagnostic(("pipeline", "path"), why_not, severity="warning",
                                                      code="stored-float8-widened"))
        if stored is None:
            continue
        tier, _ = requested_tier(doc, comp.name)
        if tier in {t.value for t in FILE_TIERS} and comp.strategy in ("layerwise", "auto"):
            # the host-tier stage keeps a storage dtype to pinned memory (for now)
            resolution.warnings.append(doc.diagnostic(
                ("pipeline", "path"), f"{comp.name}'s files store {stored}, but host_tier '{tier}' is asked for it, "
                                      "which planning keeps to weights without a storage dtype: it is widened to "
                                      f"{comp.compute_dtype} as from_pretrained does", severity="warning",
                code="stored-float8-widened"))
            continue
        if comp.strategy == "fsdp":
            resolution.warnings.append(doc.diagnostic(
                ("pipeline", "path"), f"{comp.name}'s files store {stored}, but it is sharded (fsdp): it is loaded "
                                      f"by from_pretrained and computes in {comp.compute_dtype} from widened weights",
                severity="warning", code="stored-float8-widened"))
            continue
        comp.storage_dtype = stored
        kept = [p for p in cast_skip_patterns(comp.info.class_name, comp.skip_modules) if p not in CAST_ADAPTER_SKIP]
        resolution.decisions.append(Decision(
            rule="storage-dtype", component=comp.name, from_=comp.compute_dtype, to=stored,
            reason=(f"pipeline.path's files store {comp.name}'s Linear, Conv and Embedding weights in {stored}: "
                    f"they stay {stored} (not widened to {comp.compute_dtype} on the host) and are upcast to "
                    f"{comp.compute_dtype} just before each such module runs; modules matching "
                    f"{', '.join(repr(p) for p in kept)} (and peft's adapter layers) are widened as from_pretrained "
                    "does; set storage_dtype: none to widen everything")))
