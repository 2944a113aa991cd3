"""`llmtp tokenize -z TOKENIZER -i TEXT`: the token ids of a text, BOS first."""


def register(subparsers) -> None:
    tok = subparsers.add_parser("tokenize", help="print the token ids of a text, BOS first")
    tok.add_argument("-z", "--tokenizer", required=True)
    tok.add_argument("-i", "--prompt", "--input", dest="prompt", required=True)
    tok.set_defaults(handler=run)


def run(args) -> int:
    from llmtp.common.formats.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer)
    print(" ".join(str(token) for token in tokenizer.encode(args.prompt, bos=True)))
    return 0
