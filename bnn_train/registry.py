"""Name -> object registries filled by decorators where the object is defined (timm's
@register_model, larq's quantizers): a new scheme, estimator or model is one file that registers
itself, plus its YAML under configs/."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from bnn_train.errors import ConfigError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """`group`: the config group whose options these are (for messages: `method=xnr: ...`)."""

    def __init__(self, group: str, what: str):
        super().__init__()
        self.group, self.what = group, what

    def register(self, name: str, schema: type | None = None) -> Callable[[T], T]:
        """Decorator: file `obj` under `name`; `schema` is the dataclass of its config keys (defaults to
        `obj` itself for dataclasses, such as schemes)."""

        def add(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.what} {name!r} is registered twice ({self[name]} and {obj})")
            self[name] = obj
            self.schemas[name] = schema if schema is not None else obj
            return obj

        return add

    @property
    def schemas(self) -> dict[str, type]:
        return self.__dict__.setdefault("_schemas", {})

    def lookup(self, name: Any) -> T:
        """The registered object, or a one-line ConfigError naming the options (and the closest one)."""
        if name in self:
            return self[name]
        close = difflib.get_close_matches(str(name), list(self), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{self.group}={name}: unknown {self.what}{hint}; choose one of: {', '.join(sorted(self))}")


def import_submodules(package: str) -> None:
    """Import every module of `package`, so that each file's registrations happen without a list to edit."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__, package + "."):
        importlib.import_module(info.name)
