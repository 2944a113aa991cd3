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


class WorkerLost(WorkerError):
    """A worker died, dropped its connection, or stopped answering: `index` says which."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def run_handler(args) -> int:
    """Run a parsed command's handler: LlmtpError -> one line on stderr and its exit
    code; Ctrl-C -> 130; a closed stdout pipe -> quiet exit. Other exceptions are bugs
    and keep their traceback."""
    import os
    import sys
    try:
        return args.handler(args) or 0
    except LlmtpError as error:
        sys.stdout.flush()
        print(f"llmtp: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("llmtp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
