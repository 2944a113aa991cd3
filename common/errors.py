"""Typed errors raised at the edges (files, network, config, CLI).

The CLI turns any LlmtpError into one line on stderr and a non-zero exit, with no
traceback; everything else is a bug and keeps its traceback.
"""


class LlmtpError(Exception):
    """A user-facing error: its message is one line that names the culprit."""

    exit_code = 2


class FormatError(LlmtpError):
    """A file (checkpoint, tokenizer, shard, manifest) is malformed or inconsistent."""


class ConfigError(LlmtpError):
    """A command-line argument or config file field is invalid."""


class ProtocolError(LlmtpError):
    """A peer sent something the wire protocol does not allow."""


class WorkerError(LlmtpError):
    """A worker is unreachable, refused the handshake, died, or timed out."""
