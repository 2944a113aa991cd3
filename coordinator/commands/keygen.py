"""`llmtp keygen -o DIR`: the CURVE key pairs of a cluster (coordinator, worker).

The keys are made in a private folder inside DIR, then each file is linked under its
name (never replacing one) and the folder removed: no half-written key file appears."""

import shutil
import sys
from pathlib import Path

from llmtp.common.errors import ConfigError

from .outputs import make_folder, move_without_replacing, staging_folder


def register(subparsers) -> None:
    keygen = subparsers.add_parser("keygen", help="make the CURVE key pairs of a cluster (coordinator, worker)")
    keygen.add_argument("-o", "--output", required=True, help="folder for the key files")
    keygen.set_defaults(handler=run)


def run(args) -> int:
    from llmtp.common.wire.security import KEY_NAMES, generate_keys, key_files, keys_yaml
    folder = Path(args.output)
    make_folder(folder, "-o")
    for name in KEY_NAMES:  # refuse before making anything
        for path in key_files(folder, name):
            if path.exists():
                raise ConfigError(f"{path} exists; remove the old keys first (every host then needs the new ones)")
    staging = staging_folder(folder)
    try:
        made = generate_keys(staging)
        for public, secret in made.values():
            for path in (public, secret):
                move_without_replacing(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for public, secret in made.values():
        print(f"wrote {folder / public.name} and {folder / secret.name} (secret, mode 0600)", file=sys.stderr)
    print("coordinator host needs: coordinator.key_secret, worker.key; worker hosts need: worker.key_secret, "
          "coordinator.key. Paste into the cluster YAML:", file=sys.stderr)
    print(keys_yaml(args.output))
    return 0
