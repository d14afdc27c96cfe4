"""The one exception family users see: the CLI turns each into one red line and an exit code."""


class StylekitError(Exception):
    """An error the user should see as one line; `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(StylekitError):
    """Bad flags, presets or option values (exit 2)."""

    exit_code = 2


class PresetError(UsageError):
    """A preset file that is missing, malformed, or has unknown keys or bad values."""


class SetupError(StylekitError):
    """The run could not start: nothing was processed (exit 2), e.g. a model that fails to load."""

    exit_code = 2


class ModelError(SetupError):
    """A model, LoRA, adapter or accelerator that cannot be found, downloaded or loaded."""


class InputError(StylekitError):
    """One input file that cannot be read or used; a batch reports it and goes on."""


def one_line(exc: BaseException) -> str:
    """An exception as one line: ours and OS errors as they read, others after their type name;
    only the first line of a long message (torch's out-of-memory text runs to several)."""
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    if len(first) > 300:
        first = first[:300] + "…"
    if isinstance(exc, (StylekitError, OSError)) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
