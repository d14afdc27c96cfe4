"""The one exception family users see: the CLI turns each into one red line and an exit code."""


class StylekitError(Exception):
    """An error the user should see as one line; `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(StylekitError):
    """Bad flags, presets or option values (exit 2)."""

    exit_code = 2


class PresetError(UsageError):
    """A preset file that is missing, malformed, or has unknown keys or bad values."""


class ModelError(StylekitError):
    """A model, LoRA, adapter or accelerator that cannot be found, downloaded or loaded."""


class InputError(StylekitError):
    """One input file that cannot be read or used; a batch reports it and goes on."""
