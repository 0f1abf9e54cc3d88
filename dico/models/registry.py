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
    accepted = accepted_keywords(ctor)
    unknown = sorted(set(overrides) - accepted) if accepted is not None else []
    if unknown:
        raise TypeError(f"{name} takes no argument {unknown} (model_kwargs); it takes: {', '.join(sorted(accepted))}")
    return ctor(**{**config, **overrides})


def accepted_keywords(ctor: Callable[..., Any]) -> set[str] | None:
    """The keyword arguments ``ctor`` takes, following a class's ``**kwargs`` up to the base ``__init__`` that
    receives them; None when some ``**kwargs`` takes anything."""
    names: set[str] = set()
    inits = [vars(c)["__init__"] for c in ctor.__mro__ if "__init__" in vars(c)] if isinstance(ctor, type) else [ctor]
    for init in inits:
        params = inspect.signature(init).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return names
    return None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model, e.g. ``create_model("DiCo-S")`` or ``create_model("DiT-XL/2", input_size=64)``.

    ``overrides`` replace the named configuration's arguments (``num_classes``, ``input_size``, ...).
    """
    return MODELS.build(name, **overrides)


def list_models() -> list[str]:
    return MODELS.names()
