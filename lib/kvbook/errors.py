"""kvbook's own errors: each carries one line a user can act on."""


class KvbookError(Exception):
    """One clear line for the user; the CLI prints it without a traceback."""


class BadInput(KvbookError):
    """A flag, parameter, file or name the user gave is not acceptable."""


class ModelError(KvbookError):
    """A model file or description cannot be read or is not understood."""


class ServerError(KvbookError):
    """A process kvbook started failed, timed out or answered badly."""
