"""Exceptions. The CLI turns each into one line on stderr and the exit code it carries."""


class FeatxError(Exception):
    """Base class; an unexpected internal failure (exit code 1)."""

    exit_code = 1


class UsageError(FeatxError):
    """Bad options or arguments (exit code 2)."""

    exit_code = 2


class DataError(FeatxError):
    """The data directory or an input file is unusable (exit code 2)."""

    exit_code = 2


class UnknownBackboneError(UsageError, KeyError):
    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsUnavailableError(UsageError):
    """Pretrained weights cannot be loaded (offline, missing file, wrong shapes)."""


class CacheError(FeatxError):
    """A cache file is invalid, locked by another writer, or does not match."""

    exit_code = 2


class Interrupted(FeatxError):
    """A run stopped at a clean point by SIGINT or SIGTERM; its exit code is 128 plus the
    signal's number, as a shell reports a process that signal ended."""

    def __init__(self, message, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class ImageDecodeError(DataError):
    """One image file cannot be decoded; `reason` says why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
