"""The one base class of every error fedcollm raises on purpose.

Each layer defines the errors it can name the culprit of (a config key, a data file and line, a
model, a client, a checkpoint folder) as subclasses of `FedcollmError`; the command line catches
this one class and prints its message instead of a traceback. An exception of any other type is
a bug, not bad input.
"""

from __future__ import annotations


class FedcollmError(Exception):
    """An input, setting or state that fedcollm cannot work with; the message says which and why."""


class RoundError(FedcollmError, RuntimeError):
    """A round that cannot go on: too few acceptable uploads, or an aggregate that fails its checks.

    Every round before it is checkpointed, so `fedcollm run --resume` continues from there once
    the cause is fixed.
    """
