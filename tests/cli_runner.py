"""Run the installed `llmtp` command as a user would, in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path


def llmtp_command() -> list[str]:
    script = Path(sys.executable).parent / "llmtp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmtp.coordinator.cli"]


def run_llmtp(*args, timeout: float = 120, text: bool = True, env_extra: dict | None = None,
              **kwargs) -> subprocess.CompletedProcess:
    """text=False: stdout and stderr as bytes (to compare output byte for byte)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run(llmtp_command() + [str(a) for a in args], capture_output=True, text=text,
                          timeout=timeout, env=env, **kwargs)
