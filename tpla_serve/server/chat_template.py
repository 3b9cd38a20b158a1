"""--chat-template: a Jinja file, or the name of a template shipped here; it replaces the tokenizer's own.

As SGLang reads a .jinja file: the file's text with its outer newlines stripped and written-out `\\n`
turned into newlines. The shipped `deepseek-v3` writes DeepSeek-V3's conversation format (User/Assistant
tokens, tool calls and tool outputs in DeepSeek's tool tokens) and, for requests with tools, their
definitions in the system prompt, which is what --tool-call-parser deepseekv3 reads back.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEEPSEEK_V3 = (
    "{% set ns = namespace(system='', is_tool=false, first_output=true) %}"
    "{% for message in messages if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] %}{% endfor %}"
    "{% if tools %}{% set ns.system = ns.system + ('\\n\\n' if ns.system else '') + '## Tools\\n\\nYou may call "
    "these functions; write a call as <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n"
    "```json\\nARGUMENTS\\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>\\n' %}"
    "{% for tool in tools %}{% set ns.system = ns.system + '\\n' + (tool['function'] | tojson) %}{% endfor %}"
    "{% endif %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.is_tool = false %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% set ns.is_tool = false %}{% endif %}"
    "{{ '<｜Assistant｜>' + (message['content'] or '') }}"
    "{% if message['tool_calls'] %}{{ '<｜tool▁calls▁begin｜>' }}{% for call in message['tool_calls'] %}"
    "{{ '<｜tool▁call▁begin｜>' + call['type'] + '<｜tool▁sep｜>' + call['function']['name'] + '\\n```json\\n' + "
    "call['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}{% endfor %}{{ '<｜tool▁calls▁end｜>' }}{% endif %}"
    "{{ '<｜end▁of▁sentence｜>' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if not ns.is_tool %}{{ '<｜tool▁outputs▁begin｜>' }}{% set ns.is_tool = true %}{% endif %}"
    "{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

BUILTIN_CHAT_TEMPLATES = {"chatml": CHATML, "deepseek-v3": DEEPSEEK_V3}


def resolve_chat_template(value: str) -> str:
    """The template's Jinja source; ValueError names the flag when the value is neither a name nor a file."""
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--chat-template {value}: neither a built-in template "
                         f"({', '.join(BUILTIN_CHAT_TEMPLATES)}) nor a file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--chat-template {value}: {e}") from None
    return text.strip("\n").replace("\\n", "\n")
