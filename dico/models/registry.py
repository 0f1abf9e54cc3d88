"""Name -> constructor registries: models, token mixers and channel-attention modules.

An ablation swaps a part by name (a config line), never by copying a model file.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """A named table of constructors with helpful errors for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: dict[str, Callable[..., Any]] = {}

    def register(self, *names: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            for name in names or (fn.__name__,):
                if name in self._table:
                    raise KeyError(f"{self.kind} {name!r} is registered twice")
                self._table[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._table:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._table))}")
        return self._table[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table


MODELS = Registry("model")
TOKEN_MIXERS = Registry("token mixer")
CHANNEL_ATTENTION = Registry("channel attention")


def register_model(*names: str) -> Callable[[F], F]:
    """Register a model constructor ``fn(**overrides) -> nn.Module`` under one or more names."""
    return MODELS.register(*names)


def register_configs(ctor: Callable[..., nn.Module], configs: Mapping[str, Mapping[str, Any]]) -> None:
    """Register each named configuration of ``ctor``: ``create_model(name, **overrides)`` then builds
    ``ctor(**{**configs[name], **overrides})``."""
    for name, config in configs.items():
        build = functools.partial(_build_config, name, ctor, dict(config))
        build.__doc__ = f"{name}: {dict(config)}"
        register_model(name)(build)


def _build_config(name: str, ctor: Callable[..., nn.Module], config: dict[str, Any], **overrides: Any) -> nn.Module:
    params = keyword_parameters(ctor)
    unknown = sorted(set(overrides) - set(params)) if params is not None else []
    if unknown:
        raise ValueError(f"{name} takes no argument {unknown} (model_kwargs); it takes: {', '.join(sorted(params))}")
    for key, value in overrides.items():  # a value of another kind than its default's: named, not a traceback
        default = params[key].default if params and key in params else inspect.Parameter.empty
        like = config.get(key) if default is inspect.Parameter.empty else default
        if not _same_kind(value, like):
            like = list(like) if isinstance(like, tuple) else like
            raise ValueError(
                f"model_kwargs {key}={value!r} ({type(value).__name__}) does not fit {name}, whose {key} is of type "
                f"{type(like).__name__} (e.g. {like!r})"
            )
    return ctor(**{**config, **overrides})


def _same_kind(value: Any, like: Any) -> bool:
    """Whether ``value`` can stand where ``like`` (a configured or default value) stands: anything where ``like`` is
    None or not given, an int where a float is, a list or tuple where either is."""
    if like is None or like is inspect.Parameter.empty or value is None:
        return True
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(like, bool) and isinstance(value, bool)
    if isinstance(like, float):
        return isinstance(value, (int, float))
    if isinstance(like, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(like))


def keyword_parameters(ctor: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters ``ctor`` takes, following a class's ``**kwargs`` up to the base ``__init__`` that
    receives them; None when some ``**kwargs`` takes anything."""
    params: dict[str, inspect.Parameter] = {}
    inits = [vars(c)["__init__"] for c in ctor.__mro__ if "__init__" in vars(c)] if isinstance(ctor, type) else [ctor]
    for init in inits:
        found = inspect.signature(init).parameters
        kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        params |= {n: p for n, p in found.items() if n != "self" and p.kind not in kinds}
        if not any(p.kind is p.VAR_KEYWORD for p in found.values()):
            return params
    return None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("DiCo-S")`` or ``create_model("DiT-XL/2", input_size=64)``.

    ``overrides`` replace the named configuration's arguments (``num_classes``, ``input_size``, ...).
    """
    return MODELS.build(name, **overrides)


def list_models() -> list[str]:
    return MODELS.names()
