"""`llmtp convert IN OUT --version V`: rewrite a checkpoint as llama2.c version 0, 1 or 2.

The output is written under a temporary name and renamed when complete (an interrupted
convert leaves nothing under OUT); OUT may not be IN, by path or by inode."""

import sys
from pathlib import Path

from llmtp.common.errors import ConfigError

from .arguments import positive_int
from .outputs import refuse_folder_as_file, refuse_output_onto_input


def register(subparsers) -> None:
    conv = subparsers.add_parser("convert", help="rewrite a checkpoint as llama2.c version 0, 1 or 2")
    conv.add_argument("input")
    conv.add_argument("output", help="the new file (an existing one is replaced once the new one is complete)")
    conv.add_argument("--version", type=int, choices=(0, 1, 2), required=True)
    conv.add_argument("--group-size", type=positive_int, default=None, help="int8 group size for version 2 "
                      "(default: the largest <= 64 that divides every row and that every worker count "
                      "up to n_heads can cut)")
    conv.set_defaults(handler=run)


def run(args) -> int:
    from llmtp.common.formats.checkpoint import convert_checkpoint
    input_path, output_path = Path(args.input), Path(args.output)
    if not input_path.is_file():
        raise ConfigError(f"{input_path}: no such checkpoint file")
    refuse_output_onto_input(input_path, output_path, "converted checkpoint")
    refuse_folder_as_file(output_path, "OUTPUT")
    try:
        converted = convert_checkpoint(input_path, output_path, args.version, args.group_size)
    except OSError as error:
        raise ConfigError(f"{output_path}: cannot write ({error.strerror})") from None
    detail = ""
    if converted.group_size:  # version 2: which --workers counts keep every int8 group whole
        from llmtp.common.model.quantize import cuttable_worker_counts
        counts = cuttable_worker_counts(converted.config, converted.group_size)
        detail = f", group size {converted.group_size}, cuts for --workers {', '.join(map(str, counts))}"
    print(f"wrote {output_path}: version {converted.version}, {converted.n_bytes} bytes{detail}", file=sys.stderr)
    return 0
