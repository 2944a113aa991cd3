"""`llmtp convert IN OUT --version V`: write a model as llama2.c version 0, 1 or 2.

IN is a llama2.c file, a GGUF file or a Hugging Face folder. A model that carries its own
tokenizer gets it exported as a tokenizer.bin beside OUT (or --tokenizer-out), when it is
one run.c can read. Every check runs before the first byte is written; outputs are written
under a temporary name and renamed when complete (an interrupted convert leaves nothing
under OUT); OUT may not be IN, by path or by inode."""

import sys
from pathlib import Path

from llmtp.common.errors import ConfigError

from .arguments import positive_int
from .outputs import refuse_folder_as_file, refuse_output_onto_input


def register(subparsers) -> None:
    conv = subparsers.add_parser("convert", help="write a model (llama2.c, GGUF, Hugging Face folder) as "
                                 "llama2.c version 0, 1 or 2")
    conv.add_argument("input", help="llama2.c file, GGUF file or Hugging Face folder")
    conv.add_argument("output", help="the new file (an existing one is replaced once the new one is complete)")
    conv.add_argument("--version", type=int, choices=(0, 1, 2), required=True)
    conv.add_argument("--group-size", type=positive_int, default=None, help="int8 group size for version 2 "
                      "(default: the largest <= 64 that divides every row and that every worker count "
                      "up to n_heads can cut)")
    conv.add_argument("--tokenizer-out", help="where a GGUF's or folder's tokenizer goes as tokenizer.bin "
                      "(default: tokenizer.bin beside OUTPUT)")
    conv.set_defaults(handler=run)


def run(args) -> int:
    from llmtp.common.formats.llama2c_export import check_fits_llama2c, export_llama2c, tokenizer_bin_bytes
    from llmtp.common.formats.load import load_model

    input_path, output_path = Path(args.input), Path(args.output)
    if not input_path.exists():
        raise ConfigError(f"{input_path}: no such checkpoint file or model folder")
    refuse_output_onto_input(input_path, output_path, "converted checkpoint")
    refuse_folder_as_file(output_path, "OUTPUT")
    model = load_model(input_path)
    check_fits_llama2c(model)
    tokenizer_bytes = tokenizer_bin_bytes(model)
    tokenizer = None
    if tokenizer_bytes is not None:
        tokenizer = (tokenizer_destination(args.tokenizer_out, output_path, tokenizer_bytes), tokenizer_bytes)
    elif args.tokenizer_out is not None:
        raise ConfigError(f"--tokenizer-out: {input_path} is a llama2.c file; its tokenizer is the "
                          f"tokenizer.bin or .model it came with")
    try:
        converted = export_llama2c(model, output_path, args.version, args.group_size, tokenizer)
    except OSError as error:
        raise ConfigError(f"{output_path}: cannot write ({error.strerror})") from None
    detail = ""
    if converted.group_size:  # version 2: which --workers counts keep every int8 group whole
        from llmtp.common.model.quantize import cuttable_worker_counts
        counts = cuttable_worker_counts(converted.config, converted.group_size)
        detail = f", group size {converted.group_size}, cuts for --workers {', '.join(map(str, counts))}"
    print(f"wrote {output_path}: version {converted.version}, {converted.n_bytes} bytes{detail}", file=sys.stderr)
    if tokenizer is not None:
        print(f"wrote {tokenizer[0]}: {len(tokenizer_bytes)} bytes (run.c: -z {tokenizer[0]})", file=sys.stderr)
    return 0


def tokenizer_destination(flag: str | None, output_path: Path, data: bytes) -> Path:
    """--tokenizer-out, or tokenizer.bin beside the output; never over another model's
    tokenizer.bin by default (the same bytes are left as they are)."""
    if flag is not None:
        path = Path(flag)
        refuse_folder_as_file(path, "--tokenizer-out")
        return path
    path = output_path.parent / "tokenizer.bin"
    if path.exists() and path.read_bytes() != data:
        raise ConfigError(f"{path} exists and holds another tokenizer; give --tokenizer-out PATH")
    return path
