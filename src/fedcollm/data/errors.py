"""The single exception type raised by ``fedcollm.data``."""

from fedcollm.errors import FedcollmError


class DataError(FedcollmError, ValueError):
    """Bad task, split, source, file content or partition request.

    Subclasses ``ValueError`` so callers that already guard against bad values keep working,
    while callers that care can catch data problems specifically. Messages name the culprit
    (task, split, file and line, field) and list the valid options where there are any.
    """
