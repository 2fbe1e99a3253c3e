"""Turn a typed prompt into tokens, with clear messages for bad input."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from core import store


class PromptError(ValueError):
    """The prompt cannot be run; the message is meant for the person who typed it."""


@dataclass(frozen=True)
class Prompt:
    tokens: torch.Tensor  # [1, pos], BOS first
    str_tokens: list[str]  # pos entries
    truncated_from: int | None  # original token count when the prompt was cut to fit


def prepare_prompt(model: HookedTransformer, text: str) -> Prompt:
    """Tokenize `text` with a BOS token; cut it to the model's context if it is longer.

    Raises PromptError for an empty prompt. A too-long prompt is truncated (the caller shows
    `truncated_from`) rather than refused, so the person still sees something.
    """
    if text is None or not text.strip():
        raise PromptError("The prompt is empty: type some text to analyse.")
    tokens = store.to_tokens(model, text)
    if tokens.shape[1] < 2:
        raise PromptError("The prompt produced no tokens after the BOS token.")
    truncated_from = None
    n_ctx = model.cfg.n_ctx
    if tokens.shape[1] > n_ctx:
        truncated_from = int(tokens.shape[1])
        tokens = tokens[:, :n_ctx]
    return prompt_from_tokens(model, tokens, truncated_from)


def prompt_from_tokens(model: HookedTransformer, tokens: torch.Tensor, truncated_from: int | None = None) -> Prompt:
    """A Prompt for tokens that are already made (a task's example): [pos] or [1, pos], BOS first."""
    tokens = tokens.reshape(1, -1)
    str_tokens = store.str_tokens(model, tokens[0])
    return Prompt(tokens=tokens, str_tokens=str_tokens, truncated_from=truncated_from)
