"""`llmtp generate`: run.c's flags, in this process or on workers."""

import sys
import time

from llmtp.common.errors import ConfigError

from .arguments import finite_float, non_negative_int, positive_int, positive_seconds, seed

MAX_PROMPT_BYTES = 16 << 20  # a prompt from stdin or -f: more than any context holds, less than memory


def register(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="generate text (run.c's flags)")
    gen.add_argument("checkpoint", nargs="?", help="llama2.c checkpoint (default: the bundled Shakespeare model)")
    gen.add_argument("-z", "--tokenizer", help="tokenizer.bin or SentencePiece .model "
                     "(default: tokenizer.model or tokenizer.bin beside the checkpoint)")
    gen.add_argument("--any-tokenizer", action="store_true",
                     help="accept a tokenizer with more entries than the model's vocabulary (run.c reads the "
                          "first vocab_size; without this flag such a file is refused as another model's)")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("-i", "--prompt", "--input", dest="prompt", default="",
                        help="prompt text; - reads it from stdin (one trailing newline dropped)")
    prompt.add_argument("-f", "--prompt-file", help="read the prompt from this file (one trailing newline dropped)")
    gen.add_argument("-n", "--steps", type=non_negative_int, default=256,
                     help="positions to run, prompt included (0 = seq_len; default 256)")
    gen.add_argument("-t", "--temperature", type=finite_float, default=1.0, help="0 = greedy (default 1.0)")
    gen.add_argument("-p", "--topp", type=finite_float, default=0.9, help="top-p nucleus sampling (default 0.9)")
    gen.add_argument("-k", "--top-k", dest="topk", type=non_negative_int, default=0,
                     help="keep only the k likeliest (0 = off)")
    gen.add_argument("-s", "--seed", type=seed, default=0, help="random seed, below 2**64 (0 = time, as run.c)")
    gen.add_argument("-w", "--workers", type=non_negative_int, default=0, help="run on N local worker processes "
                     "(0 = in this process)")
    gen.add_argument("--cluster", nargs="?", const="", default=None, metavar="STATE",
                     help="use the workers of `llmtp cluster up` (optional: its state file)")
    gen.add_argument("--config", help="cluster YAML: run on the workers it lists, with its tokenizer, "
                     "shard folder and timeouts")
    gen.add_argument("--context", type=positive_int, metavar="N", help="positions of context to run (default: the "
                     "model's seq_len): a shorter context than the model was trained for needs less memory")
    gen.add_argument("--timeout", type=positive_seconds, help="seconds to wait for any worker reply "
                     "(default 30, or the config's timeouts.reply)")
    gen.add_argument("--recover-wait", type=positive_seconds,
                     help="seconds to wait for a lost worker to come back before giving up "
                          "(default 30, or the config's timeouts.recover)")
    gen.add_argument("-m", "--mode", choices=("generate", "chat"), default="generate",
                     help="chat: run.c's chat mode (-y system prompt, -i first message, then User: turns)")
    gen.add_argument("-y", "--system", help="system prompt in chat mode (default: asked for, as run.c)")
    gen.set_defaults(handler=run)


def run(args) -> int:
    from .engines import EngineOptions, plan_engine

    check_sampling_args(args)
    prompt = read_prompt(args.prompt, args.prompt_file)
    if args.mode == "chat":
        from .chat import run_c_chat_mode
        return run_c_chat_mode(args, prompt)
    plan = plan_engine(EngineOptions.from_args(args))
    plan.launch()  # --workers: they start (and import numpy) while this process does
    try:
        from llmtp.common.formats.load import open_tokenizer
        from llmtp.common.model.sampler import Sampler, SamplerConfig

        from ..generate import generate, report_speed

        tokenizer = open_tokenizer(plan.tokenizer_path, plan.config.vocab_size, allow_longer=args.any_tokenizer)
        prompt_ids = tokenizer.encode(prompt, bos=True)
        if not prompt_ids:
            raise ConfigError("the prompt is empty and this model's tokenizer adds no BOS token: give a prompt (-i)")
        starts_with_bos = tokenizer.bos_id is not None and prompt_ids[0] == tokenizer.bos_id
        steps = plan_steps(args.steps, len(prompt_ids), plan.config.seq_len)
        sampler_seed = args.seed if args.seed > 0 else int(time.time())
        sampler = Sampler(SamplerConfig(temperature=args.temperature, topp=args.topp, topk=args.topk,
                                        seed=sampler_seed))
        engine = plan.open()
    except BaseException:
        plan.discard()
        raise
    decoder = tokenizer.stream_decoder()
    if starts_with_bos:
        decoder.push(prompt_ids[0])

    def emit(token: int) -> None:
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()

    try:
        result = generate(engine, sampler, prompt_ids, steps, on_token=emit,
                          stop_ids=tokenizer.stop_ids, echo_from=1 if starts_with_bos else 0)
    finally:
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        engine.close()
    report_speed(result)
    return 0


def check_sampling_args(args) -> None:
    if args.temperature < 0:
        raise ConfigError(f"-t/--temperature must be >= 0, got {args.temperature}")
    if not 0 <= args.topp <= 1:
        raise ConfigError(f"-p/--topp must be in [0, 1], got {args.topp}")


def read_prompt(text: str, prompt_file: str | None) -> str:
    """-i TEXT, -i - (stdin) or -f FILE; from stdin or a file, one trailing newline is dropped
    (what `echo` and editors add is not part of the prompt)."""
    if prompt_file is None and text != "-":
        return text
    name = "stdin (-i -)" if prompt_file is None else f"-f {prompt_file}"
    try:
        if prompt_file is None:
            data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        else:
            with open(prompt_file, "rb") as file:
                data = file.read(MAX_PROMPT_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{name}: cannot read the prompt ({error.strerror})") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise ConfigError(f"{name}: the prompt is larger than {MAX_PROMPT_BYTES >> 20} MiB")
    try:
        prompt = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{name}: the prompt is not UTF-8 text (byte {error.start})") from None
    return prompt.removesuffix("\n").removesuffix("\r")


def plan_steps(requested: int, n_prompt: int, seq_len: int) -> int:
    """run.c's rule (0 or too many -> seq_len) plus a notice, and room for one new token."""
    if n_prompt >= seq_len:
        raise ConfigError(f"prompt is {n_prompt} tokens (BOS included); the model's context is {seq_len}")
    steps = requested
    if steps <= 0 or steps > seq_len:
        if steps > seq_len:
            print(f"llmtp: notice: -n {requested} exceeds the context; clamped to seq_len {seq_len}",
                  file=sys.stderr)
        steps = seq_len
    if steps < n_prompt:
        print(f"llmtp: notice: -n {requested} is shorter than the prompt ({n_prompt} tokens); "
              f"using {n_prompt}", file=sys.stderr)
        steps = n_prompt
    return steps
