"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""


class RLHFError(Exception):
    """A problem the user can fix (bad config, bad data, missing input)."""


class ConfigError(RLHFError):
    """Invalid configuration: names the key, the bad value and what is allowed."""


class DataError(RLHFError):
    """Invalid data: names the file and line (``file:line: what is wrong``) or the split."""
