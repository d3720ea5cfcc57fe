"""xares-eval: a sandboxed submission evaluator for the XARES-LLM audio-encoder protocol.

Participants use ``xares-submit`` (init/build/validate); organizers use ``xares-eval``.
"""

from evaluator.errors import (
    ConfigError,
    DataError,
    EnvironmentUnavailable,
    ModelError,
    SandboxError,
    SubmissionError,
    XaresError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "EnvironmentUnavailable",
    "ModelError",
    "SandboxError",
    "SubmissionError",
    "XaresError",
    "__version__",
]
