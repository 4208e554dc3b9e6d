"""The array functions the memory formulas use, for plain numbers (PY) and for numpy arrays (NUMPY).

kvbook.memory.rules, .compute and .sweep write each rule once against this small namespace, so the
scalar planner and the vectorised sweep cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

# what the shared formulas take and give: a plain int/bool (PY) or a numpy array (NUMPY)
Num: TypeAlias = Any


class Scalars:
    """The namespace over plain Python numbers and bools."""

    where = staticmethod(lambda cond, a, b: a if cond else b)
    minimum = staticmethod(min)
    maximum = staticmethod(max)
    logical_or = staticmethod(lambda a, b: bool(a or b))
    logical_and = staticmethod(lambda a, b: bool(a and b))
    logical_not = staticmethod(lambda a: not a)
    to_int = staticmethod(int)


PY = Scalars()


class NumpyArrays:
    """The same names over numpy arrays (numpy is imported on first use only)."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        import numpy as np

        if name == "to_int":
            return lambda a: np.asarray(a).astype(np.int64)
        fn: Callable[..., Any] = getattr(np, name)
        return fn


NUMPY = NumpyArrays()
