"""Build the small Qwen-format (byte-level BPE) tokenizer that `tiny-flux2` and `tiny-zimage` ship with.

FLUX.2 klein and Z-Image read prompts with a Qwen3 language model through a Qwen2 tokenizer
(GPT-2 style byte-level BPE: a word carries its leading space as ``Ġ``) and a chat template.
No tokenizer can be downloaded here and we ship no third-party vocabulary, so this script learns
one: byte-level BPE merges with Qwen2's own pre-tokenizer, from an English word list, the words
our prompts use, and a few hundred made-up three-letter words (each repeated, so the vocabulary
holds rare whole-word tokens for the [V] identifier). The output under
``worker/engine/assets/tiny-qwen-tokenizer`` (``vocab.json``, ``merges.txt``,
``tokenizer_config.json`` with the chat template) is committed; this script only runs when the
vocabulary should change. It is deterministic.

    python scripts/build_tiny_qwen_tokenizer.py
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from english_words import get_english_words_set
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "worker" / "engine" / "assets" / "tiny-qwen-tokenizer"
VOCAB_SIZE = 4096
ENDOFTEXT = "<|endoftext|>"
SPECIAL = [ENDOFTEXT, "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen2's pre-tokenizer split: a word keeps the one non-letter in front of it (its space).
SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
         r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen3's chat template reduced to what the pipelines use: user turns, the generation prompt, and
# the empty thinking block that ``enable_thinking=False`` adds.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

PROMPT_WORDS = """
a an the of in on at with and photo picture portrait dog cat person man woman animal puppy kitten
beach snow jungle city street forest mountain desert river lake water ocean sea sky sunset night
wearing hat santa chef outfit police witch rainbow scarf sunglasses crown costume wet cube shaped
purple red blue green yellow shiny studio lighting professional headshot oil painting watercolor
cartoon anime sketch style high quality detailed background grass floor table sofa bed garden park
astronaut knight wizard pirate superhero renaissance cyberpunk fantasy vintage film cinematic
low blurry bad deformed ugly worst lowres user assistant
""".split()


def made_up_words(rng: random.Random, dictionary: set[str], count: int) -> list[str]:
    """``count`` three-letter lowercase strings that are not English words."""
    words: set[str] = set()
    while len(words) < count:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
        if word not in dictionary:
            words.add(word)
    return sorted(words)


def corpus(seed: int = 0) -> list[str]:
    """Lines of text: English words in sentences (so words are learned with their leading space)."""
    dictionary = {w for w in get_english_words_set(["web2"], lower=True) if w.isalpha()}
    rng = random.Random(seed)
    words = rng.sample(sorted(dictionary), 30_000) + PROMPT_WORDS * 60 + made_up_words(rng, dictionary, 300) * 8
    rng.shuffle(words)
    return [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(SPECIAL), special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    learned = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(learned["vocab"].items(), key=lambda item: item[1]))
    for token in SPECIAL:  # after the learned tokens, as in Qwen's vocabulary
        vocab[token] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 512,
        "eos_token": "<|im_end|>",
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "bos_token": None,
        "additional_special_tokens": SPECIAL[1:],
        "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main()
