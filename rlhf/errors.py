"""Errors meant for people: the CLI prints their message alone, without a traceback, and exits non-zero."""


class RLHFError(Exception):
    """Base of every error the pipeline reports to a user."""


class ConfigError(RLHFError):
    """A pipeline file or override is wrong: names the file, the key and what was expected."""


class DataError(RLHFError):
    """A data set is missing or malformed: names the file, the record and the field."""


class ModelError(RLHFError):
    """A model cannot be found or loaded."""


class StageError(RLHFError):
    """A stage cannot run: a missing parent, a conflicting run, or a failed step."""
