"""What an object was built with (pure Python): recorded init arguments, their JSON-able description, rebuilding.

Explainers record their arguments so results say which settings made them (``Explainer.params``); classifiers
record theirs so a checkpoint of a task built in Python names its network as a ``class_path`` + ``init_args``
config, like one written by the ``cfx`` command.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

_ARGUMENTS = "_init_arguments"


def record_init_arguments(cls: type) -> None:
    """Wrap ``cls.__init__`` (if ``cls`` defines one) so the outermost call stores its bound arguments.

    Call it from ``__init_subclass__``. The arguments of the constructor the caller called (the most derived
    class's, not those of the ``super().__init__`` calls inside it) are kept, defaults applied; read them with
    :func:`init_arguments`.
    """
    init = cls.__dict__.get("__init__")
    if init is None:
        return
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        if _ARGUMENTS not in self.__dict__:  # the outermost __init__: the one the caller's arguments bind to
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            object.__setattr__(self, _ARGUMENTS, dict(list(bound.arguments.items())[1:]))  # not a submodule
        init(self, *args, **kwargs)

    cls.__init__ = recording_init


def init_arguments(instance: Any) -> dict[str, Any]:
    """The arguments ``instance`` was built with (a shallow copy; empty if none were recorded)."""
    return dict(instance.__dict__.get(_ARGUMENTS, {}))


def describe(value: Any) -> Any:
    """A JSON-able description of an argument: plain values as they are, anything else by a short string."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [describe(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): describe(item) for key, item in value.items()}
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)}"
    return type(value).__name__


def is_plain(value: Any) -> bool:
    """Whether ``value`` is built of JSON types only (so a config holding it rebuilds the same object)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(is_plain(item) for item in value)
    if isinstance(value, Mapping):
        return all(isinstance(key, str) and is_plain(item) for key, item in value.items())
    return False


def class_path(cls: type) -> str:
    """``cls``'s import path through the shortest package that exports it (``cfx.counterfactual.DeDUCE``)."""
    parts = cls.__module__.split(".")
    for length in range(1, len(parts)):
        package = sys.modules.get(".".join(parts[:length]))
        if package is not None and getattr(package, cls.__qualname__, None) is cls:
            return f"{package.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def instantiate(config: Mapping[str, Any]) -> Any:
    """Build the object of a ``{"class_path": ..., "init_args": {...}}`` config.

    Raises:
        ValueError: the config is not of that form or its class cannot be imported.
    """
    if not isinstance(config, Mapping) or not isinstance(config.get("class_path"), str):
        raise ValueError(f"expected a config {{'class_path': ..., 'init_args': {{...}}}}, got {config!r}")
    module_name, _, name = config["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import {config['class_path']!r} ({error})") from error
    return cls(**dict(config.get("init_args") or {}))
