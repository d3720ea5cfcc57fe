"""Two families of exceptions, kept apart on purpose.

`XaresError` and its subclasses are *for the user*: a bad submission, bad data, a missing model, a
sandbox that cannot start. The CLI turns them into one line and an exit code. Anything else that
escapes is *our* bug: the CLI reports it as an internal error (traceback with ``--debug``).
"""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 500) -> str:
    """The first non-empty line of an exception's message (or its type), for one-line reports."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_REASONS = 30  # reason lines kept per error (a ceiling above the stages' own caps of 20); hostile input can produce thousands


class XaresError(Exception):
    """Something the user must fix. The message says what was expected, what arrived, and how to fix it."""

    exit_code = 1

    def __init__(self, message: str, *, reasons: list[str] | None = None):
        super().__init__(message)
        reasons = [r if len(r) <= 500 else r[:497] + "..." for r in map(str, reasons or [])]
        if len(reasons) > MAX_REASONS:
            reasons = reasons[:MAX_REASONS] + [f"... and {len(reasons) - MAX_REASONS} more"]
        self.reasons = reasons  # one line per failing check (the first MAX_REASONS), printed after the message


class SubmissionError(XaresError):
    """The submission (archive, manifest, encoder behaviour) breaks the contract."""


class SandboxError(SubmissionError):
    """The encoder misbehaved inside the sandbox (timeout, crash, limit hit, bad output)."""


class SandboxTimeout(SandboxError):
    """The encoder ran past a wall-clock limit: one call's, or the whole probe's or extraction's budget."""


class DataError(XaresError):
    """Task data is missing, malformed or unreadable."""


class ConfigError(XaresError):
    """A config file or option combination is invalid."""

    exit_code = 2


class ModelError(XaresError):
    """A decoder, tokenizer or metric model is missing or unusable."""


class EnvironmentUnavailable(XaresError):
    """The host lacks something the run needs (Docker engine, GPU, isolation tool)."""

    exit_code = 3
