"""Token limits: ``data.max_prompt_tokens`` and ``data.max_response_tokens``, set or derived from the data.

A limit left at null is what the data needs: the longest prompt (or response, with its EOS) as the model's
tokenizer and chat template encode it. When the two longest do not fit the model's positions together, the null
limits share what is left in proportion to those lengths, and the rows over them are over-long rows as with set
limits. `rlhf prepare` records the limits it used in ``stats.json``; the later stages read them from there, so the
generation cap is the one the data was prepared with.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_core.errors import ConfigError, DataError

MIN_PROMPT_TOKENS, MIN_RESPONSE_TOKENS = 4, 2  # the schema's lower bounds


def derive_limits(
    prompt_limit: int | None, response_limit: int | None, longest: tuple[int, int], positions: int | None
) -> dict:
    """The limits to apply: set ones as they are, null ones from ``longest`` (prompt, response) within
    ``positions`` (None: unknown, no bound). Returns ``{max_prompt_tokens, max_response_tokens, derived}``."""
    derived = [name for name, limit in (("max_prompt_tokens", prompt_limit), ("max_response_tokens", response_limit))
               if limit is None]  # fmt: skip
    prompt = longest[0] if prompt_limit is None else prompt_limit
    response = longest[1] if response_limit is None else response_limit
    if derived and positions is not None and prompt + response > positions:
        if len(derived) == 2:
            prompt = positions * longest[0] // (longest[0] + longest[1])
            response = positions - prompt
        elif prompt_limit is None:
            prompt = positions - response
        else:
            response = positions - prompt
        if prompt < MIN_PROMPT_TOKENS or response < MIN_RESPONSE_TOKENS:
            raise ConfigError(
                f"data.max_prompt_tokens + data.max_response_tokens cannot fit the model's {positions} positions "
                f"(the data's longest prompt is {longest[0]} tokens, response {longest[1]}); set both limits"
            )
    return {
        "max_prompt_tokens": max(prompt, MIN_PROMPT_TOKENS),
        "max_response_tokens": max(response, MIN_RESPONSE_TOKENS),
        "derived": derived,
    }


def prepared_limits(config) -> dict:
    """The limits `rlhf prepare` used for ``paths.data`` (recorded in its ``stats.json``)."""
    path = Path(config.paths.data) / "stats.json"
    try:
        return json.loads(path.read_text())["token_limits"]
    except FileNotFoundError:
        raise DataError(f"{path} not found (run `rlhf prepare` first)") from None
    except (KeyError, ValueError):
        raise DataError(f"{path} records no token limits: the data was prepared by an older version; run "
                        "`rlhf prepare` again") from None  # fmt: skip


def response_token_limit(config) -> int:
    """The generation cap: ``data.max_response_tokens``, or the one derived when the data was prepared."""
    if config.data.max_response_tokens is not None:
        return config.data.max_response_tokens
    return prepared_limits(config)["max_response_tokens"]
