"""``module:pkg.mod:func`` plug-ins: a user's own model or data set, named on the command line."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fedmpq.errors import ConfigError

#: Names of this form, ``module:pkg.mod:func``, name a function in any importable module.
MODULE_PREFIX = "module:"


def load_function(what: str, spec: str, target: str) -> Callable[..., Any]:
    """The function ``target`` (``pkg.mod:func``) names, for the ``what`` given as ``spec``.

    Raises
    ------
    ConfigError
        If ``target`` is not ``pkg.mod:func``, the module cannot be imported, or it has no
        such function; the message names ``what`` and ``spec``.
    """
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"{what} {spec!r} must look like {MODULE_PREFIX}pkg.mod:func")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {spec!r}: cannot import {module_name}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"{what} {spec!r}: {module_name} has no function {func_name}")
    return func
