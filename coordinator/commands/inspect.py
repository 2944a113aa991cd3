"""`llmtp inspect MODEL`: its format, shapes, stored types, tokenizer and sizes."""


def register(subparsers) -> None:
    insp = subparsers.add_parser("inspect", help="print a model's format, shapes, stored types and tokenizer")
    insp.add_argument("checkpoint", help="llama2.c file, GGUF file or Hugging Face folder")
    insp.set_defaults(handler=run)


def run(args) -> int:
    from llmtp.common.formats.load import describe_model, load_model, load_model_tokenizer
    model = load_model(args.checkpoint)
    print(describe_model(model, load_model_tokenizer(model)))
    return 0
