"""One module per `llmtp` command, each exposing register(subparsers)."""
