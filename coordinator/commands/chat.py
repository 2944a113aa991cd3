"""`llmtp chat`: talk to a model at an interactive prompt, the conversation kept in the KV cache;
and `generate -m chat`, run.c's chat mode under generate's flags."""

import time

from llmtp.common.errors import ConfigError

from .arguments import finite_float, non_negative_int, seed


def register(subparsers) -> None:
    from llmtp.coordinator.serve.opening import add_model_arguments

    chat = subparsers.add_parser("chat", help="talk to a model at an interactive prompt "
                                 "(Ctrl-C stops an answer, Ctrl-D ends)")
    add_model_arguments(chat)
    chat.add_argument("-y", "--system", help="system prompt")
    chat.add_argument("-t", "--temperature", type=finite_float, default=1.0, help="0 = greedy (default 1.0)")
    chat.add_argument("-p", "--topp", type=finite_float, default=0.9, help="top-p nucleus sampling (default 0.9)")
    chat.add_argument("-k", "--top-k", dest="topk", type=non_negative_int, default=0,
                      help="keep only the k likeliest (0 = off)")
    chat.add_argument("-s", "--seed", type=seed, default=0, help="random seed, below 2**64 (0 = time, as run.c)")
    chat.add_argument("-n", "--max-tokens", type=non_negative_int, default=0,
                      help="at most this many tokens per answer (0 = until the context is full)")
    chat.set_defaults(handler=run_chat)


def make_sampler(args):
    from llmtp.common.model.sampler import Sampler, SamplerConfig

    if args.temperature < 0:
        raise ConfigError(f"-t/--temperature must be >= 0, got {args.temperature}")
    if not 0 <= args.topp <= 1:
        raise ConfigError(f"-p/--topp must be in [0, 1], got {args.topp}")
    return Sampler(SamplerConfig(temperature=args.temperature, topp=args.topp, topk=args.topk,
                                 seed=args.seed if args.seed > 0 else int(time.time())))


def run_chat(args) -> int:
    from llmtp.coordinator.chat_loop import chat_loop, note
    from llmtp.coordinator.chat_session import ChatSession
    from llmtp.coordinator.serve.opening import open_model

    sampler = make_sampler(args)
    opened = open_model(args, n_slots=1)
    try:
        note(f"chatting with {opened.name} (chat template {opened.template.name}, context "
             f"{opened.engine.config.seq_len} tokens); Ctrl-C stops an answer, Ctrl-D ends")
        session = ChatSession(opened.engine, opened.tokenizer, opened.template, sampler, system=args.system,
                              max_answer_tokens=args.max_tokens, notify=note)
        return chat_loop(session)
    finally:
        opened.engine.close()


def run_c_chat_mode(args, prompt: str) -> int:
    """`generate -m chat [-y SYSTEM] [-i USER]`, as run.c's chat(): the system prompt from -y or
    asked for, the first user message from -i or asked for, every turn within -n positions
    (the conversation ends when they are used up), the model's chat template (llama2 for a
    llama2.c model, run.c's own)."""
    from .engines import EngineOptions, plan_engine

    plan = plan_engine(EngineOptions.from_args(args))
    plan.launch()  # -w N: they start (and import numpy) while this process does
    try:
        from llmtp.common.formats.load import open_tokenizer
        from llmtp.coordinator.chat_loop import SYSTEM_PROMPT_QUESTION, chat_loop, note, read_line
        from llmtp.coordinator.chat_session import ChatSession
        from llmtp.coordinator.serve.opening import model_template

        sampler = make_sampler(args)
        tokenizer = open_tokenizer(plan.tokenizer_path, plan.config.vocab_size, allow_longer=args.any_tokenizer)
        template = model_template(None, tokenizer, plan.checkpoint_path)
        engine = plan.open(1)
    except BaseException:
        plan.discard()
        raise
    steps = args.steps if 0 < args.steps <= plan.config.seq_len else plan.config.seq_len  # run.c's rule
    system = args.system
    try:
        if system is None:
            system = read_line(SYSTEM_PROMPT_QUESTION)
            if system is None:
                return 0
        session = ChatSession(engine, tokenizer, template, sampler, system=system, max_positions=steps,
                              drop_old_turns=False, notify=note)
        return chat_loop(session, first_user=prompt or None)
    finally:
        engine.close()
