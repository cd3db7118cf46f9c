"""User-facing errors: one clear sentence, no stack trace, non-zero exit (see cli.py)."""


class RwkvOptError(Exception):
    """An expected mistake (bad file, option, shape): the message is shown as is."""

    exit_code = 2


class CheckpointError(RwkvOptError):
    """A checkpoint that cannot be read or is not an RWKV-7 state dict."""
