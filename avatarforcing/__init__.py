"""AvatarForcing: one-step streaming talking avatars (local-future sliding-window denoising)."""

__version__ = "0.1.0"


class AvatarForcingError(Exception):
    """A user-facing error: its message is one line that names the problem and the fix.

    Entry points catch it and print ``error: <message>`` without a traceback."""
