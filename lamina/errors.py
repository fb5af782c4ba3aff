"""Exceptions lamina raises for problems a user can fix: every message names the value and what was expected."""


class LaminaError(Exception):
    """Base class of every error lamina raises on purpose."""


class ConfigError(LaminaError, ValueError):
    """A model configuration (params.json, config.json, GGUF metadata) is missing a field or holds a bad value."""


class WeightsError(LaminaError):
    """A checkpoint is missing, unreadable, or does not match its configuration."""


class TokenizerError(LaminaError):
    """A tokenizer file is missing or unreadable, or does not fit the model."""


class RequestError(LaminaError, ValueError):
    """A generation request is invalid: empty prompt, too long, bad sampling parameter, unknown token id."""


class CapacityError(RequestError):
    """A request exceeds the engine's limits (batch size, context length)."""


class ShuttingDown(CapacityError):
    """The server is shutting down: it finishes the requests it has and takes no new ones."""
