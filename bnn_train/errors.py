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


class FieldError(ConfigError):
    """A bad value of one key of a config node, raised by the node's schema (its __post_init__);
    `config.validate` prefixes the node's path, so the message names the full key."""

    def __init__(self, key: str, value, text: str):
        self.key, self.value, self.text = key, value, text
        super().__init__(f"{key}={format_value(value)}: {text}")

    def at(self, path: str) -> ConfigError:
        key = f"{path}.{self.key}" if path else self.key
        return ConfigError(f"{key}={format_value(self.value)}: {self.text}")


def format_value(value, limit: int = 60) -> str:
    """A value as the user would type it: strings quoted, null/true/false, lists in brackets."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(format_value(v, limit) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {format_value(v, limit)}" for k, v in value.items()) + "}"
    else:
        text = repr(value)  # quotes strings and escapes newlines, so the message stays one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require(ok: bool, key: str, value, text: str) -> None:
    """For a schema's __post_init__: raise FieldError(key, value, text) unless `ok`."""
    if not ok:
        raise FieldError(key, value, text)


def one_of(node, key: str, *choices) -> None:
    """For a schema's __post_init__: node.key must be one of `choices` (YAML's true/false match 'true'/'false')."""
    value = getattr(node, key)
    shown = "true" if value is True else "false" if value is False else value
    require(shown in choices, key, value, "choose one of " + ", ".join(str(c) for c in choices))
