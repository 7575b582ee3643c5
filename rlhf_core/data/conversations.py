"""Conversational rows: lists of ``{"role", "content"}`` messages, as TRL, OpenRLHF and verl keep them.

A prompt is kept in one of two forms, chosen so that the same content gives the same split row whatever file it
came from: a single user turn is its text (``"What is 7 + 5?"``, exactly what a text row holds), anything else (a
system message, a multi-turn history) stays a list of messages. A response is always text: the content of the one
assistant message that answers the prompt. The stages render both through the model's chat template
(``data.tokenize``).
"""

from __future__ import annotations

from rlhf_core.errors import BadRow

ROLES = ("system", "user", "assistant")


def is_conversation(value) -> bool:
    """True for a list of messages (a dict with a ``role`` in it); False for text and anything else."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def check_messages(messages, name: str) -> list[dict[str, str]]:
    """The messages as plain ``{"role", "content"}`` dicts; :class:`BadRow` says which message is wrong and how.

    Keys other than role and content are allowed only when empty: a parquet column of messages gives every
    message every key any message has (``tool_calls: null``), but a real tool call cannot be rendered here.
    """
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"bad message: field '{name}' must be text or a non-empty list of {{role, content}} messages")
    clean = []
    for i, message in enumerate(messages):
        where = f"bad message: field '{name}' message {i}"
        if not isinstance(message, dict):
            raise BadRow(f"{where}: expected {{role, content}}, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRow(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            kind = (
                "a list of content parts (images, tool results)"
                if isinstance(content, list)
                else type(content).__name__
            )
            raise BadRow(f"{where}: content must be text, got {kind}")
        extra = sorted(k for k, v in message.items() if k not in ("role", "content") and v not in (None, "", [], {}))
        if extra:
            raise BadRow(f"unrenderable message: field '{name}' message {i} has {', '.join(extra)} (only role and "
                         "content are rendered)")  # fmt: skip
        if role == "system" and i > 0:
            raise BadRow(f"turns out of order: field '{name}' message {i} is a system message; it must come first")
        clean.append({"role": role, "content": content})
    return clean


def check_turn_order(messages: list[dict[str, str]], name: str, last: str) -> None:
    """After an optional system message, turns alternate user/assistant from a user turn and end with ``last``."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected = "user"
    for i, message in enumerate(turns, start=len(messages) - len(turns)):
        if message["role"] != expected:
            raise BadRow(f"turns out of order: field '{name}' message {i} is a {message['role']} turn where a"
                         f"{'n' if expected == 'assistant' else ''} {expected} turn belongs (turns alternate "
                         "user/assistant after an optional system message)")  # fmt: skip
        expected = "assistant" if expected == "user" else "user"
    if not turns or turns[-1]["role"] != last:
        raise BadRow(
            f"turns out of order: field '{name}' must end with a{'n' if last == 'assistant' else ''} {last} turn"
        )


def as_prompt(messages: list[dict[str, str]]):
    """A checked prompt conversation in its kept form: a lone user turn as its text, otherwise the messages."""
    if len(messages) == 1:
        return messages[0]["content"]
    return messages


def prompt_of(value, name: str):
    """A prompt field (text or messages) in its kept form; a conversation must end with the user's turn."""
    if isinstance(value, str):
        return value
    messages = check_messages(value, name)
    check_turn_order(messages, name, last="user")
    return as_prompt(messages)


def response_of(value, name: str) -> str:
    """A response field: text, or a conversation of exactly one assistant message (TRL's conversational
    ``completion`` / ``chosen`` / ``rejected`` with an explicit prompt)."""
    if isinstance(value, str):
        return value
    messages = check_messages(value, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages)
        raise BadRow(
            f"not one answer: field '{name}' must be one assistant message answering the prompt, got [{roles}]"
        )
    return messages[0]["content"]


def split_conversation(value, name: str):
    """A whole conversation ending with the assistant's answer -> (prompt in its kept form, answer text)."""
    messages = check_messages(value, name)
    check_turn_order(messages, name, last="assistant")
    return as_prompt(messages[:-1]), messages[-1]["content"]


def split_implicit_pair(chosen, rejected, names: tuple[str, str]) -> tuple[object, str, str]:
    """A preference pair with the prompt left inside both conversations -> (prompt, chosen, rejected).

    The prompt is the longest common prefix of messages, which must leave exactly one assistant message on each
    side; two conversations that part before the last answer continue different dialogues and are no pair.
    """
    first, second = check_messages(chosen, names[0]), check_messages(rejected, names[1])
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    rest = (first[common:], second[common:])
    if any(len(r) != 1 or r[0]["role"] != "assistant" for r in rest):
        if first == second:
            raise BadRow("identical chosen and rejected responses")
        raise BadRow(
            f"prompts differ: '{names[0]}' and '{names[1]}' differ at message {common}, before their final answer "
            "(the two conversations need one prompt: the same messages up to the last assistant turn)"
        )
    check_turn_order(first, names[0], last="assistant")
    return as_prompt(first[:common]), rest[0][0]["content"], rest[1][0]["content"]
