"""`@record`: a frozen data class without the start-up cost of `dataclasses`.

The forced command runs once per SSH connection, and `import dataclasses` pulls in
`inspect` (and each decorated class compiles generated code with `exec`): together a
large share of the budget in docs/design.md (docs/performance.md). `record` builds the
same frozen, comparable, hashable value class from the class annotations with plain
functions.

Type checkers see it as a dataclass transform with frozen instances, so constructor
calls are checked exactly as for `@dataclass(frozen=True)`.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")

    @dataclass_transform(frozen_default=True)
    def record(cls: type[T]) -> type[T]: ...

    def evolve(obj: T, **changes: Any) -> T: ...

else:

    def record(cls):
        # Own annotations only, in definition order (inspect would cost what we avoid).
        names = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
        defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
        setter = object.__setattr__

        def __init__(self, *args, **kwargs):
            if len(args) > len(names):
                raise TypeError(f"{cls.__name__} takes {len(names)} arguments")
            values = dict(zip(names, args, strict=False))
            for key, value in kwargs.items():
                if key not in names or key in values:
                    raise TypeError(f"{cls.__name__}: unexpected or repeated argument {key!r}")
                values[key] = value
            for name in names:
                if name in values:
                    setter(self, name, values[name])
                elif name in defaults:
                    setter(self, name, defaults[name])
                else:
                    raise TypeError(f"{cls.__name__}: missing argument {name!r}")

        def __setattr__(self, name, value):
            raise AttributeError(f"{cls.__name__} is frozen: cannot set {name!r}")

        def __eq__(self, other):
            if other.__class__ is not self.__class__:
                return NotImplemented
            return all(getattr(self, n) == getattr(other, n) for n in names)

        def __hash__(self):
            return hash(tuple(getattr(self, n) for n in names))

        def __repr__(self):
            inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
            return f"{cls.__name__}({inner})"

        cls.__init__ = __init__
        cls.__setattr__ = __setattr__
        cls.__delattr__ = __setattr__
        cls.__eq__ = __eq__
        cls.__hash__ = __hash__
        cls.__repr__ = __repr__
        cls.__record_fields__ = names
        return cls

    def evolve(obj, **changes):
        """A copy of `obj` with some fields changed (like `dataclasses.replace`)."""
        values = {n: getattr(obj, n) for n in obj.__record_fields__}
        values.update(changes)
        return obj.__class__(**values)
