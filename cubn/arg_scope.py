"""slim's ``arg_scope`` / ``add_arg_scope``: default keyword arguments per function, by block.

``with arg_scope([f, g], k=v):`` makes ``k=v`` the default of every call of
``f`` and ``g`` inside the block (both must be decorated with
``@add_arg_scope``). Scopes nest (an inner scope adds to and overrides the
outer one), a keyword given at the call site wins over every scope, and the
scope dict that ``with arg_scope(...) as sc:`` yields can be entered again
later with ``with arg_scope(sc):`` -- the way slim's ``*_arg_scope()``
functions hand a whole configuration around.

The scopes live in a context variable: each thread (and asyncio task) has its
own stack, where slim had one per process.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

from ._checks import arg_error, describe

_stack: contextvars.ContextVar[dict] = contextvars.ContextVar("cubn_arg_scope", default={})


def _key(func) -> str:
    """The key a decorated function's defaults are stored under."""
    return getattr(func, "_key_op", None) or f"{func.__module__}.{func.__qualname__}"


def current_arg_scope() -> dict:
    """The active scope: ``{function key: {argument: default}}`` (a copy)."""
    return {k: dict(v) for k, v in _stack.get().items()}


def add_arg_scope(func):
    """Decorate ``func`` so that ``arg_scope`` can give it default keyword arguments."""
    key = _key(func)

    @functools.wraps(func)
    def with_scope(*args, **kwargs):
        defaults = _stack.get().get(key)
        if defaults:
            kwargs = {**defaults, **kwargs}  # the call site wins
        return func(*args, **kwargs)

    with_scope._key_op = key
    with_scope._arg_scope_decorated = True
    return with_scope


def has_arg_scope(func) -> bool:
    """True when ``func`` was decorated with [`add_arg_scope`][add_arg_scope]."""
    return bool(getattr(func, "_arg_scope_decorated", False))


def arg_scoped_arguments(func) -> list:
    """The argument names ``func`` accepts (what an ``arg_scope`` may set for it)."""
    import inspect

    return list(inspect.signature(func).parameters)


@contextlib.contextmanager
def arg_scope(list_ops_or_scope, **kwargs):
    """Set default keyword arguments of the decorated functions in ``list_ops_or_scope``.

    Args:
        list_ops_or_scope: a list or tuple of functions decorated with
            [`add_arg_scope`][add_arg_scope], or a scope dict yielded by an earlier
            ``arg_scope`` (re-entered as it was; no keywords then).
        **kwargs: the defaults.

    Yields:
        The scope now active (a dict to re-enter later).
    """
    if isinstance(list_ops_or_scope, dict):
        if kwargs:
            raise arg_error(ValueError, "arg_scope", "kwargs", "no keywords when re-entering a saved scope",
                            ", ".join(sorted(kwargs)))
        scope = {k: dict(v) for k, v in list_ops_or_scope.items()}
    else:
        if not isinstance(list_ops_or_scope, (list, tuple)):
            raise arg_error(TypeError, "arg_scope", "list_ops_or_scope",
                            "a list or tuple of functions, or a saved scope dict", describe(list_ops_or_scope))
        scope = current_arg_scope()
        for op in list_ops_or_scope:
            if not has_arg_scope(op):
                raise arg_error(ValueError, "arg_scope", "list_ops_or_scope",
                                "functions decorated with @add_arg_scope", f"{getattr(op, '__name__', op)!r}")
            names = arg_scoped_arguments(op)
            unknown = [k for k in kwargs if k not in names]
            if unknown and not _takes_var_keywords(op):
                raise arg_error(TypeError, "arg_scope", unknown[0], f"an argument of {op.__name__}",
                                "an argument it does not take")
            key = _key(op)
            scope[key] = {**scope.get(key, {}), **kwargs}
    token = _stack.set(scope)
    try:
        yield {k: dict(v) for k, v in scope.items()}
    finally:
        _stack.reset(token)


def _takes_var_keywords(func) -> bool:
    import inspect

    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(func).parameters.values())
