"""The rare-token identifier "[V]" that names the subject in every prompt.

DreamBooth binds the subject to a token the base model barely knows, so fine-tuning does not have
to fight a strong prior. The paper picks a *rare single token of at most three characters* from the
tokenizer's own vocabulary. Two well-known mistakes are avoided here:

- "sks" (the default of many trainers) is a rifle, and leaks guns into pictures;
- random strings such as "xxy5syt00" split into several common tokens, so they are not rare at all.

A BPE vocabulary lists merges roughly in order of frequency, so late ids are rarer tokens; the
identifier is drawn from the rarer half of the eligible whole-word tokens. Two kinds of BPE are
understood, told apart by how they tokenize " a":

- CLIP's (SD, SDXL): lower case, a word's last token ends with ``</w>``;
- byte-level BPE of the LLM text encoders (Qwen for FLUX.2 klein and Z-Image, GPT-2 style): a word
  inside a sentence carries its leading space as ``Ġ``, so a whole-word token is ``Ġ`` + the word,
  and the identifier must be that one token where prompts put it ("a photo of [V] dog").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

from worker.engine.errors import EngineInputError

WORD_END = "</w>"
WORD_START = "Ġ"  # byte-level BPE: the leading space of a word inside a sentence
MAX_IDENTIFIER_CHARS = 3
MIN_IDENTIFIER_CHARS = 2  # one letter is almost always a word ("a", "i") or an initial
# Tokens never chosen even when they pass every other test: "sks" is a rifle, the rest are
# abbreviations that carry strong meanings of their own.
BLOCKED_IDENTIFIERS = frozenset({"sks", "ak", "ar", "gun", "ww", "nsfw", "xxx", "kkk", "sex", "nazi", "ss"})


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the identifier code uses."""

    def get_vocab(self) -> dict[str, int]: ...

    def tokenize(self, text: str) -> list[str]: ...


@lru_cache(maxsize=1)
def _dictionary() -> frozenset[str]:
    from english_words import get_english_words_set

    return frozenset(get_english_words_set(["web2"], lower=True))


def is_dictionary_word(word: str) -> bool:
    """True when ``word`` (any case) is an English word in the web2 word list."""
    return word.lower() in _dictionary()


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """True for a byte-level BPE tokenizer (words inside a sentence start with ``Ġ``), False for CLIP's."""
    tokens = tokenizer.tokenize(" a")
    return bool(tokens) and tokens[-1].startswith(WORD_START)


def _word_token(tokenizer: Tokenizer, word: str, byte_level: bool | None = None) -> str:
    """The vocabulary entry that ``word`` is when it is one token inside a sentence."""
    if byte_level is None:
        byte_level = is_byte_level(tokenizer)
    return WORD_START + word if byte_level else word + WORD_END


def _word_of(token: str, byte_level: bool) -> str | None:
    """The word a whole-word vocabulary entry stands for, or None for a piece of a word."""
    if byte_level:
        return token[len(WORD_START):] if token.startswith(WORD_START) else None
    return token[: -len(WORD_END)] if token.endswith(WORD_END) else None


def eligible_identifiers(tokenizer: Tokenizer) -> list[str]:
    """Every token that could serve as [V], ordered from the most common to the rarest (by vocab id).

    Eligible: a whole-word token (CLIP: word-final; byte-level BPE: with its leading space) of 2-3
    lowercase ASCII letters that is not an English word and not blocked. (CLIP lowercases its
    input, so upper-case vocabulary entries can never be produced; identifiers are lower case for
    every tokenizer.)
    """
    byte_level = is_byte_level(tokenizer)
    candidates: list[tuple[int, str]] = []
    for token, token_id in tokenizer.get_vocab().items():
        word = _word_of(token, byte_level)
        if word is None:
            continue
        text = word
        if not (MIN_IDENTIFIER_CHARS <= len(text) <= MAX_IDENTIFIER_CHARS):
            continue
        if not (text.isascii() and text.isalpha() and text.islower()):
            continue
        if text in BLOCKED_IDENTIFIERS or is_dictionary_word(text):
            continue
        candidates.append((token_id, text))
    return [text for _, text in sorted(candidates)]


def _check_class_noun(class_noun: str) -> str:
    noun = class_noun.strip()
    if not noun:
        raise EngineInputError("class noun is empty; give the kind of subject, e.g. 'dog' or 'person'")
    return noun


def is_single_token(tokenizer: Tokenizer, identifier: str, class_noun: str) -> bool:
    """True when "identifier class_noun" tokenizes with the identifier as exactly one token.

    Byte-level BPE is checked inside a sentence (" identifier class_noun"), where prompts put it.
    """
    byte_level = is_byte_level(tokenizer)
    prefix = " " if byte_level else ""
    tokens = tokenizer.tokenize(f"{prefix}{identifier} {class_noun}")
    noun_tokens = tokenizer.tokenize(f"{prefix}{class_noun}")
    return (
        len(tokens) == 1 + len(noun_tokens)
        and tokens[0] == _word_token(tokenizer, identifier.lower(), byte_level)
        and tokens[1:] == noun_tokens
    )


def _as_list(tokenizers: Tokenizer | Sequence[Tokenizer]) -> list[Tokenizer]:
    return list(tokenizers) if isinstance(tokenizers, Sequence) else [tokenizers]


def choose_identifier(tokenizers: Tokenizer | Sequence[Tokenizer], class_noun: str, seed: int = 0) -> str:
    """A rare single-token identifier for ``class_noun``, the same for the same tokenizers and seed.

    With several tokenizers (SDXL has two) the candidates come from the first and the identifier
    must stay one token in every one of them. Raises :class:`EngineInputError` when the class noun
    is empty or the vocabulary has no usable token.
    """
    all_tokenizers = _as_list(tokenizers)
    tokenizer = all_tokenizers[0]
    noun = _check_class_noun(class_noun)
    noun_words = {word.lower() for word in noun.split()}
    eligible = [text for text in eligible_identifiers(tokenizer) if text not in noun_words]
    rarer_half = eligible[len(eligible) // 2 :]
    if not rarer_half:
        raise EngineInputError("the base model's tokenizer has no rare short token to use as the identifier")
    order = list(rarer_half)
    random.Random(seed).shuffle(order)
    for identifier in order:
        if all(is_single_token(each, identifier, noun) for each in all_tokenizers):
            return identifier
    raise EngineInputError(f"no rare token stays a single token before the class noun {noun!r}")


def validate_identifier(tokenizers: Tokenizer | Sequence[Tokenizer], identifier: str, class_noun: str) -> str:
    """Check a caller-chosen identifier and return it normalized (stripped, lowercase).

    Raises :class:`EngineInputError` naming the identifier when it is empty, contains spaces, is
    "sks", or does not tokenize as exactly one token in front of the class noun.
    """
    noun = _check_class_noun(class_noun)
    text = identifier.strip().lower()
    if not text:
        raise EngineInputError("identifier is empty")
    if any(ch.isspace() for ch in text):
        raise EngineInputError(f"identifier {identifier!r} must be a single word")
    if text == "sks":
        raise EngineInputError("identifier 'sks' is refused: it names a rifle and leaks guns into pictures")
    if text in {word.lower() for word in noun.split()}:
        raise EngineInputError(f"identifier {identifier!r} is the class noun itself")
    for tokenizer in _as_list(tokenizers):
        if is_single_token(tokenizer, text, noun):
            continue
        pieces = tokenizer.tokenize(f" {text}" if is_byte_level(tokenizer) else text)
        raise EngineInputError(
            f"identifier {identifier!r} is not one token of the base model's tokenizer "
            f"(it splits into {len(pieces)}: {' '.join(pieces)})"
        )
    return text
