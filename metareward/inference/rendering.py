"""Chat prompts rendered once into token ids with the model's own chat template, and forced-verdict tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from metareward.inference.base import InferenceError, Messages


class ChatRenderer:
    """Renders chat messages with a tokenizer's chat template straight to token ids.

    Rendering to text and tokenising that text again would add a second BOS for templates that write
    their own (Llama 3, the tiny test model): token ids are produced in one step instead.
    """

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if tokenizer.chat_template is None:
            raise InferenceError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template: "
                "set model.chat_template in the campaign config"
            )

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> ChatRenderer:
        """Load the tokenizer of a local model folder (or hub id) and wrap it."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), chat_template)

    def render(self, messages: Messages) -> list[int]:
        """Token ids of the conversation followed by the assistant's generation prompt."""
        encoded = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def encode(self, text: str) -> list[int]:
        """Token ids of text that continues a rendered prompt (no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def count_tokens(self, text: str) -> int:
        """How many tokens text takes as a continuation."""
        return len(self.encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated token ids, special tokens left out."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def choice_tokens(self, messages: Messages, assistant_prefix: str,
                      choices: Sequence[str]) -> tuple[list[int], list[int]]:
        """(prompt ids, one token id per choice) such that prompt ids + that token spell the conversation,
        the assistant_prefix and the choice.

        The canonical tokenisation is used when every choice ends in one distinct token after a common
        prefix. Byte-level BPEs are not uniform ("Score: 1" may end in " 1" but "Score: 0" in " ", "0"), so
        otherwise the prefix is encoded alone and each choice (or " " + choice, when the prefix ends in a
        space) must be one token. Raises InferenceError when no split gives one distinct token per choice.
        """
        encodings = [self.encode(assistant_prefix + choice) for choice in choices]
        common = 0
        while all(len(e) > common for e in encodings) and len({e[common] for e in encodings}) == 1:
            common += 1
        splits = [(encodings[0][:common], [e[common:] for e in encodings])]
        splits.append((self.encode(assistant_prefix), [self.encode(choice) for choice in choices]))
        stripped = assistant_prefix.rstrip(" ")
        if stripped != assistant_prefix:
            splits.append((self.encode(stripped), [self.encode(" " + choice) for choice in choices]))
        for prefix_ids, tails in splits:
            if all(len(tail) == 1 for tail in tails) and len({tail[0] for tail in tails}) == len(tails):
                return self.render(messages) + prefix_ids, [tail[0] for tail in tails]
        raise InferenceError(
            f"forced verdicts need each of {list(choices)} to be one token after {assistant_prefix[-20:]!r}, "
            "which this tokenizer does not allow: use verdict_mode: free"
        )
