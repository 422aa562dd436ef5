"""Errors that the CLI and the server report as one clear message, never a traceback."""

from __future__ import annotations


class TGIError(Exception):
    """Base of every error tgi-core raises on purpose; its message is meant for users."""

    exit_code = 1


class PluginError(TGIError):
    """A plugin could not be loaded, or registered something invalid.

    The message always names the distribution at fault.
    """


class ConfigError(TGIError):
    """A configuration value is unknown, malformed or out of range.

    The message names the key, where the value came from and what is allowed.
    """

    exit_code = 2
