"""The Anthropic HH-RLHF text format: a transcript of ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns."""

from __future__ import annotations

import re

from rlhf_core.errors import BadRow

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_transcript(text: str) -> tuple[str, str]:
    """HH-RLHF transcript -> (dialogue history ending with the last human turn, final assistant response)."""
    text = text if text.startswith("\n\n") else "\n\n" + text.lstrip()
    cut = text.rfind(ASSISTANT)
    if cut < 0 or HUMAN not in text[:cut]:
        raise BadRow("not an HH-RLHF transcript: needs '\\n\\nHuman:' then '\\n\\nAssistant:' turns")
    if HUMAN in text[cut:]:
        raise BadRow("the transcript ends with a human turn, not an assistant response")
    history, response = text[:cut].strip(), text[cut + len(ASSISTANT) :].strip()
    if not response:
        raise BadRow("empty final assistant response")
    return history, response


def history_messages(history: str) -> list[dict[str, str]]:
    """A dialogue history (``Human: a\\n\\nAssistant: b\\n\\nHuman: c``) as its alternating chat turns."""
    parts = _TURN.split(history.strip())[1:]  # speaker, text, speaker, text, ...
    return [{"role": _ROLES[who], "content": text.strip()} for who, text in zip(parts[::2], parts[1::2], strict=True)]
