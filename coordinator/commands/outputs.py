"""Checks and writes shared by the commands that write files (convert, shard, keygen):
an output never replaces its own input, and appears under its name only once complete."""

import os
import tempfile
from pathlib import Path

from llmtp.common.errors import ConfigError


def refuse_output_onto_input(input_path: Path, output_path: Path, what: str) -> None:
    """The same path, a symlink or a hard link to the input: writing would destroy what is read."""
    try:
        same = output_path.exists() and os.path.samefile(input_path, output_path)
    except OSError:
        same = False
    if same or output_path.resolve() == input_path.resolve():
        raise ConfigError(f"{output_path}: the output is the input {input_path} (same file); "
                          f"write the {what} to another path")


def refuse_folder_as_file(path: Path, flag: str) -> None:
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: a folder; give a file name")


def make_folder(path: Path, flag: str) -> None:
    """mkdir -p, with a failure (a file in the way, /proc, no permission) as one line."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{flag} {path}: cannot create the folder ({error.strerror})") from None


def staging_folder(beside: Path) -> Path:
    """A private temporary folder on the same file system as `beside`'s folder, for
    files to be renamed into place."""
    return Path(tempfile.mkdtemp(prefix=f".{beside.name}.", dir=beside))


def move_without_replacing(source: Path, destination: Path) -> None:
    """Appear under `destination` atomically, never replacing a file there (link, then unlink)."""
    try:
        os.link(source, destination)
    except FileExistsError:
        raise ConfigError(f"{destination} exists; remove it first") from None
    source.unlink()
