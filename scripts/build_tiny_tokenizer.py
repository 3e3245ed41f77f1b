"""Build the small CLIP-format tokenizer that the built-in `tiny` model ships with.

The output (``vocab.json`` and ``merges.txt`` under ``worker/engine/assets/tiny-tokenizer``) is
committed, so this script only runs when the vocabulary should change. It learns byte-level BPE
merges, CLIP style (lower case, ``</w>`` marks the end of a word), from an English word list plus
the words our prompt packs use, so prompts tokenize into whole words and the vocabulary still
holds rare short fragments to serve as the [V] identifier.

    python scripts/build_tiny_tokenizer.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from english_words import get_english_words_set
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "worker" / "engine" / "assets" / "tiny-tokenizer"
VOCAB_SIZE = 4096
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]

# Words the studio's prompts use often: they should be single tokens.
PROMPT_WORDS = """
a an the of in on at with and photo picture portrait dog cat person man woman animal puppy kitten
beach snow jungle city street forest mountain desert river lake water ocean sea sky sunset night
wearing hat santa chef outfit police witch rainbow scarf sunglasses crown costume wet cube shaped
purple red blue green yellow shiny studio lighting professional headshot oil painting watercolor
cartoon anime sketch style high quality detailed background grass floor table sofa bed garden park
astronaut knight wizard pirate superhero renaissance cyberpunk fantasy vintage film cinematic
low blurry bad deformed ugly worst lowres
""".split()


def corpus(seed: int = 0) -> list[str]:
    words = sorted(w for w in get_english_words_set(["web2"], lower=True) if w.isalpha())
    rng = random.Random(seed)
    sample = rng.sample(words, 40_000)
    return sample + PROMPT_WORDS * 50


def main() -> None:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    learned = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]

    # CLIP's layout: every byte symbol, every byte symbol ending a word, the merges in rank
    # order, then the special tokens.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    ordered = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split(" ")) for m in merges]
    vocab: dict[str, int] = {}
    for token in ordered + SPECIAL:
        vocab.setdefault(token, len(vocab))

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {OUT}")


if __name__ == "__main__":
    main()
