"""Keywords renamed for one release: the old spelling still works, warns, and
says the exact replacement.

The storage mode of a dump, a baseline cache and a capture is one concept
with one name, ``storage="full" | "topk:K"`` (the values of
``dump.parse_storage``, the CLI's ``--storage``); ``logits=`` (``capture``,
``DumpWriter``) and ``cache_topk=K`` (``perplexity``) were its old names.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keyword(old: str, new: str, convert: Callable[[Any], Any] = lambda v: v, *,
                    where: str | None = None) -> Callable[[F], F]:
    """Decorate a function whose keyword ``old`` is now ``new``.

    A call with ``old=v`` warns (DeprecationWarning naming ``new=convert(v)``,
    the exact replacement) and runs as ``new=convert(v)``; a call with both is
    a TypeError naming both. ``convert`` maps an old value to the new one
    (and raises ValueError, naming ``old``, for a value the old keyword never
    took). ``where``: the name shown in messages (default: the function's
    qualified name; ``DumpWriter`` for ``DumpWriter.__init__``).
    """

    def wrap(fn: F) -> F:
        name = where or fn.__qualname__

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                value = kwargs.pop(old)
                if new in kwargs:
                    raise TypeError(f"{name}() got both {new}= and its old name {old}=; pass only "
                                    f"{new}={kwargs[new]!r}")
                kwargs[new] = convert(value)
                warnings.warn(f"{name}({old}={value!r}) is deprecated; use {new}={kwargs[new]!r} "
                              f"({old}= goes in the next release)", DeprecationWarning, stacklevel=2)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def storage_from_cache_topk(k: Any) -> str:
    """``perplexity(cache_topk=K)`` -> ``storage="topk:K"`` (None -> "full")."""
    if k is None:
        return "full"
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"cache_topk must be an int >= 1, got {k!r}; pass storage='topk:K' instead")
    return f"topk:{k}"
