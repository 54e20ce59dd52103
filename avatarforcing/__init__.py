"""AvatarForcing: one-step streaming talking avatars (local-future sliding-window denoising)."""

__version__ = "0.1.0"


class AvatarForcingError(Exception):
    """A user-facing error: its message is one line that names the problem and the fix.

    Entry points catch it and print ``error: <message>`` without a traceback (:func:`run_command`)."""


def run_command(fn, interrupted: str | None = None) -> int:
    """Run a command-line entry point: exit status 0, or 1 with ``error: <message>`` on stderr for an
    :class:`AvatarForcingError` (no traceback), or 130 on Ctrl-C (printing ``interrupted`` if given)."""
    import sys

    try:
        fn()
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if interrupted:
            print(f"error: {interrupted}", file=sys.stderr)
        return 130
    return 0
