"""Building a component's module: its class from ``model_index.json``, on the meta device from its
config, or by the library's own ``from_pretrained``; weights given their own aligned storage.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from planner.errors import FolderError, PlanApplyError
from planner.files.bounded_read import load_json_file


def _library_of(cls: type) -> str | None:
    try:
        from diffusers.models.modeling_utils import ModelMixin

        if issubclass(cls, ModelMixin):
            return "diffusers"
    except ImportError:  # pragma: no cover
        pass
    try:
        from transformers import PreTrainedModel

        if issubclass(cls, PreTrainedModel):
            return "transformers"
    except ImportError:  # pragma: no cover
        pass
    return None


def json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of a model folder, read through the bounded reader; ``PlanApplyError`` naming
    the file when it is unreadable or not an object."""
    try:
        value = load_json_file(path, what)
    except FolderError as exc:
        raise PlanApplyError(str(exc)) from None
    if not isinstance(value, dict):
        raise PlanApplyError(f"{path}: {what} is not a JSON object")
    return value


def check_config_depth(folder: Path, tensors: int) -> None:
    """Refuses a ``config.json`` whose depth (any integer whose key names layers or blocks) exceeds
    ``tensors``, the tensors its weight files hold (every block holds one; a caller may bound it
    tighter): a model of a billion blocks, built even on meta (by this loader or by
    ``from_pretrained``), would not finish."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return
    config = json_object(config_file, "config.json")
    todo: list[tuple[str, Any]] = [("", config)]       # nested configs too (a VLM's text_config)
    while todo:
        where, section = todo.pop()
        for key, value in section.items():
            if isinstance(value, dict):
                todo.append((f"{where}{key}.", value))
            elif ("layers" in key or "blocks" in key) and isinstance(value, int) and not isinstance(value, bool) \
                    and value > max(tensors, 1):
                raise PlanApplyError(f"{config_file}: {where}{key} is {value}, more than the {tensors} tensors its "
                                     "weight files hold; refused (the module would not finish building)")


def _build_on_meta(cls: type, library: str, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The module as ``from_pretrained`` builds it before reading weights: parameters on meta,
    buffers computed at construction, the plan dtype as default dtype."""
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if library == "diffusers":
            from diffusers.models.modeling_utils import no_init_weights

            config = cls.load_config(str(folder))
            with no_init_weights(), init_empty_weights():
                model = cls.from_config(config)
            model.register_to_config(_name_or_path=str(folder))
        else:
            config_class = getattr(cls, "config_class", None)
            if config_class is None:  # pragma: no cover - every transformers model has one
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(str(folder))
            else:
                config = config_class.from_pretrained(str(folder))
            with init_empty_weights():
                model = cls._from_config(config, dtype=dtype)
            if hasattr(model, "tie_weights"):   # from_pretrained ties after loading; on meta it is free
                model.tie_weights()
            model.config.name_or_path = str(folder)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# the libraries whose classes a model_index.json entry may name; a diffusers pipeline module
# named alone ("stable_diffusion") means diffusers.pipelines.stable_diffusion, as diffusers reads it
_COMPONENT_LIBRARIES = ("diffusers", "transformers")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _component_class(library: str, class_name: str, pipeline_class: str | None) -> type:
    """The class a ``model_index.json`` entry ``[library, class_name]`` names, imported only from
    diffusers or transformers (or their submodules); anything else is refused before any import."""
    entry = f"model_index.json entry [{library!r}, {class_name!r}]"
    if not (isinstance(library, str) and _DOTTED.match(library) and isinstance(class_name, str)
            and _DOTTED.match(class_name) and "." not in class_name):
        raise PlanApplyError(f"{entry}: not a library and a class name; refused")
    if library.split(".")[0] in _COMPONENT_LIBRARIES:
        candidates = [library]
    else:
        from importlib.util import find_spec

        try:
            in_diffusers = find_spec(f"diffusers.pipelines.{library}") is not None
        except (ImportError, ValueError):
            in_diffusers = False
        if not in_diffusers:
            raise PlanApplyError(f"{entry}: components are imported only from "
                                 f"{' and '.join(_COMPONENT_LIBRARIES)}, not from {library!r}; refused")
        candidates = [f"diffusers.pipelines.{library}"]
    if library == "diffusers" and isinstance(pipeline_class, str) and pipeline_class:
        try:
            import diffusers

            pipe_cls = getattr(diffusers, pipeline_class, None)
            if isinstance(pipe_cls, type) and pipe_cls.__module__.startswith("diffusers."):
                mod = pipe_cls.__module__
                candidates += [mod, mod.rsplit(".", 1)[0]]
        except ImportError:  # pragma: no cover
            pass
    for name in candidates:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        cls = getattr(module, class_name, None)
        if isinstance(cls, type):
            return cls
    raise PlanApplyError(f"{entry}: cannot import component class {library}.{class_name}")


def _from_pretrained(cls: type, library: str | None, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The library's own loader, weights then copied out of the file mapping into ordinary memory
    (views of a mapped file can shift CPU kernels by 1e-7, and keep the file's pages resident)."""
    with _quiet_diffusers():
        model = cls.from_pretrained(str(folder), **_dtype_kwargs(library, dtype))
    materialize(model)
    return model.eval()


def materialize(module: torch.nn.Module) -> None:
    """Give every weight its own aligned, contiguous storage, out of any safetensors mapping.

    from_pretrained leaves parameters as views into the mapped file, whose tensor data is only
    8-byte aligned; CPU kernels take different vectorised paths for such inputs, which changes
    float summation order (1e-7 on tiny pipelines). Replacing ``.data`` keeps the Parameter
    objects, so tied weights stay tied.
    """
    with torch.no_grad():
        for param in module.parameters():
            param.data = param.data.detach().clone(memory_format=torch.contiguous_format)
        for sub in module.modules():
            for name, buf in list(sub._buffers.items()):
                if buf is not None:
                    sub._buffers[name] = buf.detach().clone(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """No per-component progress bar, no ``torch_dtype`` deprecation notice (newer diffusers
    prefer ``dtype``, older ones know only ``torch_dtype``)."""
    from diffusers.utils import logging as dlogging

    was = dlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        if was:
            dlogging.enable_progress_bar()


def _dtype_kwargs(library: str | None, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` for transformers >= 4.56 (which deprecates ``torch_dtype``), else ``torch_dtype=``."""
    if library == "transformers":
        import transformers

        major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
        if (major, minor) >= (4, 56):
            return {"dtype": dtype}
    return {"torch_dtype": dtype}


def _pipeline_class(index: Mapping[str, Any]) -> Any:
    """The pipeline class named in model_index.json. Its own ``from_pretrained``, not
    ``DiffusionPipeline``'s: only the concrete class knows its ``_optional_components``, and
    ``DiffusionPipeline.from_pretrained`` loads an optional component from disk even when one is
    passed (Wan 2.2's ``transformer_2``)."""
    import diffusers

    name = index.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) else diffusers.DiffusionPipeline
