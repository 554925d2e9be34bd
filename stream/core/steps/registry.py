"""What pipeline steps share: a registry by name and the options of a step that has none.

A step class has a `name` and an `Options` dataclass whose fields are its config entries (in
seconds, not samples; constraints as `Annotated[..., Ge(...)]`), validated where pipelines are
read (stream/pipeline.py). Registries only map names to classes: no I/O, no models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class NoOptions:
    pass


class Registry(Generic[T]):
    def __init__(self, kind: str, reserved: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}
        self._reserved = reserved

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make the step available to pipelines under `cls.name`."""
        name: Any = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} step needs a `name`")
        if name in self._classes or name in self._reserved:
            raise ValueError(f"a {self.kind} named {name!r} exists already")
        self._classes[name] = cls
        return cls

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def names(self) -> list[str]:
        return sorted(self._classes)
