"""The one base class of the errors a user can cause (a bad file, a wrong option, a damaged index).

``str()`` of a :class:`UserError` is a one-line message saying what is wrong and, where it can, what
to do; the ``hassod`` command group prints it as ``error: …`` with exit status 2 instead of a traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input or files, not by a bug; ``str()`` is the one-line message."""
