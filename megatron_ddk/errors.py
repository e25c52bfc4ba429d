"""The project's own error types: raised where a user can act, and only these become one-line errors.

``pretrain_ddk.py`` and the tools catch ``UserError`` alone and print its message on one line
(``MEGATRON_DDK_TRACEBACK=1`` shows the traceback); every other exception, including a bug deep
inside megatron-core, keeps its traceback.

Each type also derives from ``ValueError`` (``MissingFileError`` from ``FileNotFoundError`` too), so
library callers that catch the built-in type keep working; the entry points catch ``UserError`` and
nothing broader.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a flag, a file, a value. The message names it and says what to do."""


class ConfigError(UserError, ValueError):
    """A flag or a combination of flags is invalid, or the machine cannot do what they ask."""


class DataError(UserError, ValueError):
    """A dataset, registry, tokenizer file or input document is missing or does not fit the run."""


class CheckpointError(UserError, ValueError):
    """A checkpoint (or cache) is missing, incomplete, damaged, unsafe, or does not fit the run."""


class MissingFileError(DataError, FileNotFoundError):
    """A file or directory named by a flag does not exist."""
