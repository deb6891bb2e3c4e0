"""Modules that are also their main function: ``kvmem.query`` is the module kvmem/query.py and
``kvmem.query(model, prompt)`` calls its function ``query``.

Before, ``kvmem/__init__.py`` did ``from kvmem.query import query``, which replaced the package attribute
``kvmem.query`` (the submodule) with the function: ``import kvmem.query as q`` then gave the function, and
``kvmem.query.forward_coefficients`` failed. Making the module callable keeps both the notebook API
(``kvmem.query(...)``) and the module (``kvmem.query.stack_padded``, ``import kvmem.query``).
"""

from __future__ import annotations

import inspect
import sys
import types


class CallableModule(types.ModuleType):
    """A module whose call is its function of the same name (the last part of its dotted name)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(name: str) -> None:
    """Turn the imported module ``name`` into a CallableModule; ``inspect.signature`` and ``help`` of the
    module show its function's signature."""
    module = sys.modules[name]
    module.__class__ = CallableModule
    fn = getattr(module, name.rsplit(".", 1)[-1])
    module.__signature__ = inspect.signature(fn)
