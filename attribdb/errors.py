"""Domain exceptions.

Every error a user can cause is one of these, with a message that says what
went wrong and how to fix it; the CLI turns them into a one-line
``Error: ...`` and a non-zero exit instead of a traceback.
"""


class AttribdbError(Exception):
    """Base class for every error attribdb raises on purpose."""


class ConfigError(AttribdbError):
    """A setting is invalid or contradicts what is stored on disk."""


class CorpusError(AttribdbError):
    """The training corpus cannot be read as asked."""


class ModelMismatchError(AttribdbError):
    """The model does not match the one a database or factor file was built with."""


class StoreError(AttribdbError):
    """The database on disk is missing, incomplete or corrupted."""


class QueryError(AttribdbError):
    """A query cannot be answered as given (empty completion, too long, ...)."""
