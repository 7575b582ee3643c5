"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""


class RLHFError(Exception):
    """A problem the user can fix (bad config, bad data, missing input)."""


class ConfigError(RLHFError):
    """Invalid configuration: names the key, the bad value and what is allowed."""


class DataError(RLHFError):
    """Invalid data: names the file and line (``file:line: what is wrong``) or the split."""


class BadRow(ValueError):
    """One data row is malformed; the message says what is wrong (the reader adds ``file:line`` or ``file row N``
    and applies ``data.on_bad_rows``)."""
