"""User-facing errors: each carries one line saying what was wrong and what to do.

`train.py` prints these as a single line and exits non-zero instead of showing a traceback.
"""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, bad checkpoint)."""

    exit_code = 2


class ConfigError(UserError):
    """A config value, key or combination that cannot work."""


class DataError(UserError):
    """A dataset that is missing, unreadable or laid out wrongly."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or from another model."""


class TrainingError(UserError):
    """A run that cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""

    exit_code = 3
