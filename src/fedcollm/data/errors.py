"""The single exception type raised by ``fedcollm.data``."""

import re

from fedcollm.errors import FedcollmError


class DataError(FedcollmError, ValueError):
    """Bad task, split, source, file content or partition request.

    Subclasses ``ValueError`` so callers that already guard against bad values keep working,
    while callers that care can catch data problems specifically. Messages name the culprit
    (task, split, file and line, field) and list the valid options where there are any.
    """


_VALUE = re.compile(r", got .*$", re.DOTALL)


def without_values(message: str) -> str:
    """A data error's message with the offending value cut (", got ..."), keeping file, line and
    field: what a site may tell the server about its bad file without showing its records."""
    return _VALUE.sub(", got a value the site keeps to itself", message)
