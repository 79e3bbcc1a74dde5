"""User errors: bad config values, options, files and environments, refused in one line.

`ConfigError` (defined with the checks in `optim.validation`, the lowest layer, and re-exported
here) is the one exception type of a refused value, which `train.py` turns into a single line
on stderr and exit code 2 (a full traceback with `debug=true`). Everything else keeps its
traceback: a `ValueError` raised deep inside the training step is a bug, not a user error, and
must not be disguised as one. The checks (`optim.validation`, `kinetic.validate`), the
checkpoint and run-directory checks (`kinetic/checkpoint.py`) and the builders at the config
boundary raise it; third-party or
author-written constructors that refuse their arguments with `ValueError` are wrapped by
`refused_arguments` (their own message kept, the config key prefixed). That wrapper goes around
a constructor call at the config boundary only: inside it a `ValueError` or `TypeError` is, by
the house convention, the constructor refusing its arguments; inside the training loop the same
exceptions are bugs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from optim.validation import ConfigError, keyword_parameters

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_USER_ERROR",
    "ConfigError",
    "call_with_config",
    "refused_arguments",
]

EXIT_USER_ERROR = 2  # a refused input: nothing ran (scripts and sweeps tell it from a divergence)
EXIT_DIVERGED = 1  # the run started and diverged (non-finite loss or too many skipped steps)


@contextmanager
def refused_arguments(where: str) -> Iterator[None]:
    """Inside the block, a `ValueError` or `TypeError` is a constructor refusing the user's
    arguments: re-raise it as `ConfigError("<where>: <message>")`, chained to the original
    (its traceback is shown by `debug=true`).

    Use it around the construction of a user-configured object only (an optimizer, an
    environment, a dataset), never around training code. `where` names the config node, e.g.
    `"env=HyperGrid"`; pass `""` to keep the message as it is.
    """
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from err


def call_with_config(factory: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> Any:
    """`factory(**kwargs)` for a config node: unknown or missing keys, and a `ValueError` or
    `TypeError` from the factory, become a `ConfigError` naming `where` (and the valid keys);
    any other exception keeps its traceback. Unlike `hydra.utils.instantiate`, the factory's own
    message reaches the user without Hydra's InstantiationException wrapper."""
    name = getattr(factory, "__name__", repr(factory))
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as err:
            valid = keyword_parameters(signature)
            raise ConfigError(
                f"{where}: {name} does not accept these keys ({err}); valid keys: "
                f"{', '.join(valid)}"
            ) from err
    with refused_arguments(where):
        return factory(**kwargs)
