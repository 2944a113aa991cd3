"""Chat templates: a list of messages -> the prompt text a chat model was trained on -> token ids.

Three kinds:
  - "llama2": Llama 2 chat as llama2.c's run.c builds it in chat mode: every user turn is
    BOS + "[INST] {user} [/INST]", the first one carrying the system prompt as
    "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]"; an answer is followed by EOS.
  - "chatml": "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message.
  - a Jinja template string, as a GGUF file's `tokenizer.chat_template` or a
    tokenizer_config.json's `chat_template` carries it, rendered the way transformers'
    apply_chat_template does (sandboxed environment, trim_blocks + lstrip_blocks, the
    variables messages, bos_token, eos_token, add_generation_prompt and raise_exception).

render() spells BOS and EOS as "<s>" and "</s>" (for reading); encode_chat() renders them as
private-use sentinels, which it strips from message text first, so that only the template can
make a BOS or EOS id: "<s>" typed in a message stays characters.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from llmtp.common.errors import ConfigError

BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    """name: what to call it in messages; source: Jinja text; stop: strings that end an answer
    (besides EOS), for templates whose models close a turn with text rather than EOS."""

    name: str
    source: str
    stop: tuple[str, ...] = ()

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
               bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN) -> str:
        return _render_jinja(self, messages, add_generation_prompt, bos_token, eos_token)


# The Llama 2 template as run.c renders a conversation: each user turn is its own BOS-led
# "[INST] ... [/INST]", the system prompt folds into the first, answers end with EOS.
LLAMA2_SOURCE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}"
    "{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('llama2 chat: a system message must come first') }}{% endif %}"
    "{% endfor %}"
)

CHATML_SOURCE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {
    "llama2": ChatTemplate("llama2", LLAMA2_SOURCE),
    "chatml": ChatTemplate("chatml", CHATML_SOURCE, stop=("<|im_end|>",)),
}


def resolve_chat_template(spec: str | None, model_folder: Path | None = None) -> ChatTemplate:
    """--chat-template NAME|FILE, or (None) the model's own: a tokenizer_config.json beside the
    checkpoint that has a chat_template, else llama2 (the format llama2.c's models use).

    FILE is a Jinja text file or a tokenizer_config.json."""
    if spec is None:
        config_path = model_folder / "tokenizer_config.json" if model_folder else None
        if config_path is not None and config_path.exists():
            template = _from_tokenizer_config(config_path, required=False)
            if template is not None:
                return template
        return BUILTIN_TEMPLATES["llama2"]
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--chat-template {spec!r} is neither {' nor '.join(BUILTIN_TEMPLATES)} nor a file")
    if path.suffix == ".json":
        return _from_tokenizer_config(path, required=True)
    return jinja_template(_read_text(path), name=str(path))


def jinja_template(source: str, name: str = "jinja") -> ChatTemplate:
    """A template from Jinja text; compiled once here so a syntax error is reported up front."""
    _compile(source, name)
    stop = ("<|im_end|>",) if "<|im_end|>" in source else ()
    return ChatTemplate(name, source, stop)


def _from_tokenizer_config(path: Path, required: bool) -> ChatTemplate | None:
    try:
        config = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}") from None
    source = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(source, list):  # transformers also allows [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        source = named.get("default")
    if not isinstance(source, str):
        if required:
            raise ConfigError(f"{path} has no chat_template string")
        return None
    return jinja_template(source, name=f"{path}:chat_template")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read chat template {path}: {error}") from None


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = _raise_template_error
    return environment


class TemplateError(ConfigError):
    """A template refused the messages (raise_exception) or failed to render."""


def _raise_template_error(message: str):
    raise TemplateError(message)


def _compile(source: str, name: str):
    from jinja2 import TemplateError as JinjaError
    try:
        return _environment().from_string(source)
    except JinjaError as error:
        raise ConfigError(f"chat template {name} does not compile: {error}") from None


def _render_jinja(template: ChatTemplate, messages: list[ChatMessage], add_generation_prompt: bool,
                  bos_token: str, eos_token: str) -> str:
    from jinja2 import TemplateError as JinjaError
    compiled = _compile(template.source, template.name)
    try:
        return compiled.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                               bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt)
    except TemplateError:
        raise
    except (JinjaError, TypeError, ValueError) as error:  # TypeError: e.g. str + None inside the template
        raise TemplateError(f"chat template {template.name} failed: {error}") from None


_BOS_SENTINEL, _EOS_SENTINEL = "\ue000", "\ue001"  # private-use codepoints, removed from messages


def encode_chat(tokenizer, template: ChatTemplate, messages: list[ChatMessage],
                add_generation_prompt: bool = True) -> list[int]:
    """messages -> prompt ids: BOS and EOS where the template puts them, each run of text
    between them encoded on its own (its own dummy-prefix space, as run.c encodes each
    rendered turn); text before a first BOS is encoded without one."""
    clean = [ChatMessage(m.role, m.content.replace(_BOS_SENTINEL, "").replace(_EOS_SENTINEL, ""))
             for m in messages]
    text = template.render(clean, add_generation_prompt, _BOS_SENTINEL, _EOS_SENTINEL)
    ids: list[int] = []
    for piece_index, piece in enumerate(text.split(_BOS_SENTINEL)):
        if piece_index > 0:
            ids.append(tokenizer.bos_id)
        for part_index, part in enumerate(piece.split(_EOS_SENTINEL)):
            if part_index > 0:
                ids.append(tokenizer.eos_id)
            if part:
                ids.extend(tokenizer.encode(part, bos=False))
    return ids
