"""`python -m llmtp`: the same as the `llmtp` command."""

import sys

from llmtp.coordinator.cli import main

sys.exit(main())
