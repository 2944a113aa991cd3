"""`llmtp inspect CHECKPOINT`: its format, shapes and sizes."""


def register(subparsers) -> None:
    insp = subparsers.add_parser("inspect", help="print a checkpoint's format, shapes and sizes")
    insp.add_argument("checkpoint")
    insp.set_defaults(handler=run)


def run(args) -> int:
    from llmtp.common.formats.checkpoint import describe_checkpoint, load_checkpoint
    print(describe_checkpoint(load_checkpoint(args.checkpoint)))
    return 0
