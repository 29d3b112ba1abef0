"""The one exception kquant's commands turn into an `error:` line."""
from __future__ import annotations


class ModelError(ValueError):
    """A model input kquant cannot use: one clear message for the user, no traceback."""
