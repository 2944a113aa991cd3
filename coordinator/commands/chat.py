"""`llmtp chat`: talk to a model at the terminal (placeholder until the command lands)."""


def register(subparsers) -> None:
    pass
