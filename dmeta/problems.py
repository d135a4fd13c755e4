"""Task families of one's own, named by import path: `problem = "package.module:Class"`.

The class derives from `dmeta.tasks.TaskFamily` and implements its abstract methods (`sample`,
`validation_set`, `build_model`); its settings are the fields of its `Options` dataclass, set in
the job's [problem_options] table (see the README's "Your own task family" and
examples/my_task.py). The module is imported when the config is loaded, the working folder
searched first (as `python -m` does), so every mistake in it is one `dmeta: error:` line before
anything runs; the same holds for an exception of the class's constructor or `build_model`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import os
import sys
import sysconfig
import traceback
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from torch import nn

from dmeta.errors import DmetaError
from dmeta.models import FlatModel
from dmeta.tasks import TaskBatch, TaskFamily

HELP = "see the README's 'Your own task family'"
# Types of an Options field: those of the config's own keys.
OPTION_TYPES = (int, float, bool, str)


def _library_folders() -> tuple[str, ...]:
    """Where dmeta, the standard library and installed packages live: not the user's code."""
    paths = sysconfig.get_paths()
    folders = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(os.path.join(folder, "") for folder in folders | {os.path.dirname(__file__)})


def describe(error: BaseException) -> str:
    """`Type: message (file:line)` of an exception raised in a user's code, on one line: the
    place is the innermost frame outside dmeta, the standard library and installed packages."""
    message = " ".join(str(error).split())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if isinstance(error, SyntaxError):  # its message names its place
        return text
    library = _library_folders()
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith(("<", *library))
    ]
    if frames:
        text += f" ({frames[-1].filename}:{frames[-1].lineno})"
    return text


@contextmanager
def user_code(what: str) -> Iterator[None]:
    """Turn an exception of a user's task family into one DmetaError line naming `what`."""
    try:
        yield
    except DmetaError:
        raise
    except Exception as error:
        raise DmetaError(f"{what} raised {describe(error)}") from error


def _search_working_folder() -> None:
    """Put the working folder first on the module search path, as `python -m` does (the
    `dmeta` console script does not), so `examples.my_task` is found from the repository."""
    folder = os.getcwd()
    if folder not in sys.path and "" not in sys.path:
        sys.path.insert(0, folder)
    importlib.invalidate_caches()  # a module written since the last import is seen


def _import(problem: str, module_name: str) -> Any:
    _search_working_folder()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise DmetaError(
                f"problem = {problem!r}: no module named {missing!r} in the working folder "
                f"{os.getcwd()}, PYTHONPATH or the installed packages"
            ) from None
        raise DmetaError(
            f"problem = {problem!r}: importing {module_name} raised {describe(error)}"
        ) from None
    except Exception as error:
        raise DmetaError(
            f"problem = {problem!r}: importing {module_name} raised {describe(error)}"
        ) from None


def task_class(problem: str) -> type[TaskFamily]:
    """The TaskFamily subclass that `problem` ("package.module:Class") names, checked: the module
    imports, holds the class, which derives from TaskFamily, implements its abstract methods and
    declares its Options as a dataclass of config types with defaults; else DmetaError."""
    module_name, _, attribute = problem.partition(":")
    names = module_name.split(".") + attribute.split(".")
    if not all(name.isidentifier() for name in names):
        raise DmetaError(
            f"problem = {problem!r} is not an import path 'package.module:Class' ({HELP})"
        )
    module = _import(problem, module_name)
    found: Any = module
    for name in attribute.split("."):
        if not hasattr(found, name):
            where = getattr(module, "__file__", None) or module_name
            raise DmetaError(f"problem = {problem!r}: {where} has no attribute {name!r}")
        found = getattr(found, name)
    if not isinstance(found, type):
        raise DmetaError(
            f"problem = {problem!r} names an object of type {type(found).__name__!r}, not a "
            f"class deriving from dmeta.tasks.TaskFamily ({HELP})"
        )
    if not issubclass(found, TaskFamily):
        raise DmetaError(
            f"problem = {problem!r}: class {found.__name__} does not derive from "
            f"dmeta.tasks.TaskFamily; subclass it ({HELP})"
        )
    missing = sorted(getattr(found, "__abstractmethods__", ()))
    if missing:
        raise DmetaError(
            f"problem = {problem!r}: class {found.__name__} does not implement "
            f"{', '.join(missing)} (the abstract methods of dmeta.tasks.TaskFamily)"
        )
    _check_options_class(problem, found.Options)
    return found


def _check_options_class(problem: str, options: Any, prefix: str = "Options") -> None:
    """Options is a dataclass whose fields have defaults and the types config keys have."""
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise DmetaError(
            f"problem = {problem!r}: {prefix} must be a dataclass (its fields are the keys of "
            "[problem_options])"
        )
    try:
        hints = typing.get_type_hints(options)
    except Exception as error:
        raise DmetaError(
            f"problem = {problem!r}: the types of {prefix} do not resolve ({describe(error)})"
        ) from None
    for item in dataclasses.fields(options):
        annotation = hints[item.name]
        if dataclasses.is_dataclass(annotation):
            _check_options_class(problem, annotation, f"{prefix}.{item.name}")
        elif not _supported(annotation):
            name = annotation.__name__ if isinstance(annotation, type) else repr(annotation)
            raise DmetaError(
                f"problem = {problem!r}: {prefix}.{item.name} has the type {name}; an "
                "option is an int, float, bool, str, Literal[...], list[...] of these or a "
                "dataclass"
            )
        if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            raise DmetaError(
                f"problem = {problem!r}: {prefix}.{item.name} needs a default (a job file sets "
                "only the options it changes)"
            )


def _supported(annotation: Any) -> bool:
    if annotation in OPTION_TYPES:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return True
    if origin is list:
        (item,) = typing.get_args(annotation) or (None,)
        return item in OPTION_TYPES or typing.get_origin(item) is Literal
    return False


def build_family_model(task: TaskFamily, problem: str, config: Any) -> FlatModel:
    """`task.build_model(config)` of a family given by import path, as a FlatModel (a module is
    wrapped in one); its exceptions are DmetaError lines."""
    with user_code(f"{problem} build_model"):
        model = task.build_model(config)
        if isinstance(model, nn.Module):
            try:
                model = FlatModel(model)
            except DmetaError as error:
                raise DmetaError(f"{problem} build_model: {error}") from None
    if not isinstance(model, FlatModel):
        raise DmetaError(
            f"{problem} build_model returned an object of type {type(model).__name__!r}; "
            "return a dmeta.models.FlatModel or a torch.nn.Module"
        )
    return model


def check_batch(batch: Any, leading: tuple[int | None, ...], what: str) -> None:
    """A TaskBatch of four tensors [*leading, shots, ...] (None: any size), the support and the
    query set each with as many inputs as targets; DmetaError naming `what` otherwise."""
    if not isinstance(batch, TaskBatch):
        raise DmetaError(
            f"{what} returned an object of type {type(batch).__name__!r}; return a "
            "dmeta.tasks.TaskBatch"
        )
    shapes = {name: getattr(part, "shape", None) for name, part in batch._asdict().items()}
    expected = "[" + ", ".join("*" if n is None else str(n) for n in leading) + ", shots, ...]"
    for name, shape in shapes.items():
        if (
            shape is None
            or len(shape) <= len(leading)
            or any(n is not None and n != size for n, size in zip(leading, shape, strict=False))
        ):
            raise DmetaError(
                f"{what} returned {name} of shape {None if shape is None else list(shape)}; "
                f"every part must be a tensor {expected}"
            )
    depth = len(leading) + 1
    for x, y in (("support_x", "support_y"), ("query_x", "query_y")):
        if shapes[x][:depth] != shapes[y][:depth]:
            raise DmetaError(
                f"{what} returned {x} {list(shapes[x])} and {y} {list(shapes[y])}: an input and "
                "its target must share the leading dimensions and shots"
            )


def source(problem: str) -> dict[str, str]:
    """Run-file attributes naming the file of a family given by import path and its SHA-256
    (its code is not part of dmeta's git commit)."""
    module = sys.modules.get(problem.partition(":")[0])
    try:
        path = inspect.getsourcefile(module) if module is not None else None
    except TypeError:  # a built-in or namespace module
        path = None
    if not path:
        return {"problem_file": "", "problem_file_sha256": ""}
    with open(path, "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    return {"problem_file": os.path.abspath(path), "problem_file_sha256": digest}
