"""Tests for the rare-token identifier."""

from __future__ import annotations

import pytest

from worker.engine.errors import EngineInputError
from worker.engine.identifiers import (
    choose_identifier,
    eligible_identifiers,
    is_dictionary_word,
    validate_identifier,
)
from worker.engine.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


@pytest.mark.parametrize("class_noun", ["dog", "cat", "person", "teddy bear"])
@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_identifier_is_one_rare_token_and_not_a_word(tokenizer, class_noun: str, seed: int) -> None:
    identifier = choose_identifier(tokenizer, class_noun, seed=seed)
    assert identifier != "sks"
    assert 2 <= len(identifier) <= 3 and identifier.isalpha() and identifier.islower()
    assert not is_dictionary_word(identifier)
    tokens = tokenizer.tokenize(f"a photo of {identifier} {class_noun}")
    assert tokens[3] == identifier + "</w>"
    assert tokens[4:] == tokenizer.tokenize(class_noun)


def test_identifier_is_deterministic_per_seed_and_varies_with_seed(tokenizer) -> None:
    first = [choose_identifier(tokenizer, "dog", seed=s) for s in range(8)]
    again = [choose_identifier(tokenizer, "dog", seed=s) for s in range(8)]
    assert first == again
    assert len(set(first)) > 1


def test_identifier_comes_from_the_rarer_part_of_the_vocabulary(tokenizer) -> None:
    ordered = eligible_identifiers(tokenizer)
    rarer = set(ordered[len(ordered) // 2 :])
    vocab = tokenizer.get_vocab()
    for seed in range(10):
        identifier = choose_identifier(tokenizer, "dog", seed=seed)
        assert identifier in rarer
        assert vocab[identifier + "</w>"] >= vocab[ordered[len(ordered) // 2] + "</w>"]


def test_eligible_tokens_exclude_sks_words_and_numbers(tokenizer) -> None:
    eligible = eligible_identifiers(tokenizer)
    assert eligible, "the tiny vocabulary must offer candidates"
    assert "sks" not in eligible
    assert all(not is_dictionary_word(token) for token in eligible)
    assert all(token.isalpha() for token in eligible)


def test_validate_identifier_accepts_a_single_token(tokenizer) -> None:
    chosen = choose_identifier(tokenizer, "dog")
    assert validate_identifier(tokenizer, chosen.upper(), "dog") == chosen


@pytest.mark.parametrize(
    ("identifier", "message"),
    [
        ("xqzv", "not one token"),
        ("sks", "rifle"),
        ("", "empty"),
        ("ab cd", "single word"),
        ("dog", "class noun"),
    ],
)
def test_validate_identifier_rejects_bad_overrides(tokenizer, identifier: str, message: str) -> None:
    with pytest.raises(EngineInputError, match=message):
        validate_identifier(tokenizer, identifier, "dog")


def test_empty_class_noun_is_refused(tokenizer) -> None:
    with pytest.raises(EngineInputError, match="class noun"):
        choose_identifier(tokenizer, "  ")


class _Splitting:
    """A second tokenizer (SDXL has two) that splits one particular token into two pieces."""

    def __init__(self, inner, splits: str) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.splits = inner, splits

    def get_vocab(self) -> dict[str, int]:
        return dict(self.inner.get_vocab())

    def tokenize(self, text: str) -> list[str]:
        tokens = list(self.inner.tokenize(text))
        target = self.splits + "</w>"
        if target in tokens:
            at = tokens.index(target)
            tokens[at: at + 1] = [self.splits[0], self.splits[1:] + "</w>"]
        return tokens


def test_with_two_tokenizers_the_identifier_is_one_token_in_both(tokenizer) -> None:  # type: ignore[no-untyped-def]
    alone = choose_identifier(tokenizer, "dog", seed=3)
    both = choose_identifier([tokenizer, _Splitting(tokenizer, alone)], "dog", seed=3)
    assert both != alone  # the first choice splits in the second tokenizer, so another is taken
    assert validate_identifier([tokenizer, tokenizer], both, "dog") == both
    with pytest.raises(EngineInputError, match="not one token"):
        validate_identifier([tokenizer, _Splitting(tokenizer, alone)], alone, "dog")
