"""Find the lists of repeated blocks inside a loaded model, and count weight bytes.

Execution side: imports torch, but only when a function runs, so importing ``planner.executor``
stays cheap.

Discovery is generic: diffusers models name their repeated block classes in ``_repeated_blocks``
(what ``compile_repeated_blocks`` uses) and both diffusers and transformers name them in
``_no_split_modules`` (what accelerate's ``device_map`` keeps whole). A layer list is an
``nn.ModuleList`` whose items are all instances of those classes.

Order: lists come in registration order (``named_modules`` order). That is the order the forward
runs them for every catalog model we checked: Z-Image registers and runs ``noise_refiner``,
``context_refiner`` (``siglip_refiner``), then ``layers``; Flux ``transformer_blocks`` then
``single_transformer_blocks``; Qwen2.5-VL ``visual.blocks`` then ``language_model.layers``.
No forward is traced to check it. A VLM text encoder's vision tower (Qwen2.5-VL, Gemma 3) is
listed, first, although a text-only prompt never runs it; an engine that streams layers should
expect those layers to be skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _names(value: Any) -> list[str]:
    # ``_no_split_modules`` is None on a bare diffusers ModelMixin and may be a set elsewhere.
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def repeated_block_classes(module: "torch.nn.Module") -> set[str]:
    """Class names of the repeated blocks a model declares.

    The model's own ``_repeated_blocks`` and ``_no_split_modules`` when it declares any (read from
    the instance: transformers fills an instance's ``_no_split_modules`` with those of its
    sub-models, e.g. a VLM text encoder's vision tower). Only when the model declares nothing are
    the declarations of nested sub-models used.
    """
    own = set(_names(getattr(module, "_repeated_blocks", None)))
    own |= set(_names(getattr(module, "_no_split_modules", None)))
    if own:
        return own
    found: set[str] = set()
    for sub in module.modules():
        if sub is module:
            continue
        found |= set(_names(getattr(sub, "_repeated_blocks", None)))
        found |= set(_names(getattr(sub, "_no_split_modules", None)))
    return found


def discover_layer_lists(module: "torch.nn.Module",
                         overrides: Sequence[str] | None = None) -> list[tuple[str, "torch.nn.ModuleList"]]:
    """The lists of repeated blocks of ``module`` as ``(dotted path, ModuleList)``, in run order.

    ``overrides``, when given (even empty), replaces discovery: each entry is a dotted path,
    relative to ``module``, to an ``nn.ModuleList``; a path that is missing or not a ModuleList
    raises ``ValueError``. Discovered lists nested inside a block of an earlier list are left out,
    so no weight is counted twice. A model without declared or found blocks gives ``[]``.
    """
    import torch.nn as nn

    if overrides is not None:
        out: list[tuple[str, nn.ModuleList]] = []
        seen: set[str] = set()
        for path in overrides:
            try:
                sub = module.get_submodule(path)
            except AttributeError as exc:
                raise ValueError(f"layer list override {path!r}: no such submodule in "
                                 f"{type(module).__name__}") from exc
            if not isinstance(sub, nn.ModuleList):
                raise ValueError(f"layer list override {path!r} is a {type(sub).__name__}, "
                                 f"not a torch.nn.ModuleList")
            if path in seen:
                continue
            seen.add(path)
            out.append((path, sub))
        return out

    classes = repeated_block_classes(module)
    if not classes:
        return []
    found: list[tuple[str, nn.ModuleList]] = []
    taken: list[str] = []
    # remove_duplicate=True (the default) also keeps a ModuleList shared under two names once.
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.ModuleList) or len(sub) == 0 or not name:
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue  # inside a block already found
        if all(type(item).__name__ in classes for item in sub):
            found.append((name, sub))
            taken.append(name)
    return found


def _tensors(module: "torch.nn.Module") -> Iterable["torch.Tensor"]:
    # parameters() and buffers() skip tied duplicates (T5's shared / encoder.embed_tokens);
    # ids guard against a tensor registered both as a parameter and as a buffer elsewhere.
    seen: set[int] = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        yield t


def layer_weight_bytes(module: "torch.nn.Module", dtype: "torch.dtype | None" = None) -> int:
    """Bytes of the parameters and buffers of ``module`` (tied tensors once).

    With ``dtype``, floating-point tensors count at that dtype's element size (what the weights
    will take once cast); integer and bool tensors always count at their own size. Works on
    the meta device.
    """
    total = 0
    for t in _tensors(module):
        if dtype is not None and t.is_floating_point():
            size = dtype.itemsize
        else:
            size = t.element_size()
        total += t.numel() * size
    return total


def dominant_dtype(module: "torch.nn.Module") -> str:
    """Name (``"bfloat16"``) of the floating dtype holding the most bytes; ``"float32"`` if none."""
    by_dtype: dict[Any, int] = {}
    for t in _tensors(module):
        if t.is_floating_point():
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel() * t.element_size()
    if not by_dtype:
        return "float32"
    best = max(sorted(by_dtype, key=str), key=lambda d: by_dtype[d])
    return str(best).removeprefix("torch.")
