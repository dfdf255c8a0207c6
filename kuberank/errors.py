"""Errors a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class KuberankError(Exception):
    """Base class for errors caused by input or environment, not by a bug."""


class DataError(KuberankError):
    """Bad input data: names the file, the line (when there is one) and the problem."""

    def __init__(self, path: str, problem: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class StorageError(KuberankError):
    """A storage URI that cannot be read or written."""


class StorageNotFound(StorageError):
    """A storage URI that names nothing (no file, object or prefix): the one storage error
    that may mean "absent" rather than "cannot read"."""
