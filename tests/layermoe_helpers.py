"""Shared data of the LayerMoE tests: word lists and random documents, the authors' Llama-3.2-3B worksheet, a
similarity.json builder."""

from __future__ import annotations

import random

WORDS = {
    "en": "the cat sat on a mat and the dog ran to the big red house with my friend".split(),
    "tr": "bir kedi ev ve köpek büyük kırmızı arkadaş ile gitti bu çok güzel".split(),
    "hu": "egy macska ház és kutya nagy piros barát el ment ez nagyon szép".split(),
    "es": "el gato casa y perro grande rojo amigo con fue muy bonito".split(),
}


def make_texts(lang: str, num_docs: int, seed: int = 0, max_words: int = 20) -> list[str]:
    """`num_docs` random sentences of 3..max_words words from the language's word list."""
    rng = random.Random(f"{lang}-{seed}")
    return [" ".join(rng.choices(WORDS[lang], k=rng.randint(3, max_words))) for _ in range(num_docs)]


# docs/method.md §4: Llama-3.2-3B, G1 (el/hu/tr vs en/es/zh), layers 0-27, and the allocation the worksheet gives
LLAMA_S = [
    0.0359,
    0.0402,
    0.0352,
    0.0503,
    0.0636,
    0.0698,
    0.0842,
    0.0960,
    0.0945,
    0.0978,
    0.1060,
    0.1094,
    0.1164,
    0.1074,
    0.1152,
    0.1109,
    0.0973,
    0.0907,
    0.0830,
    0.0835,
    0.0778,
    0.0683,
    0.0685,
    0.0548,
    0.0498,
    0.0497,
    0.0481,
    0.0453,
]
LLAMA_N = [5, 5, 5, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4]


def similarity_json(scores):
    """A minimal similarity.json holding per-layer scores."""
    return {
        "num_layers": len(scores),
        "per_layer": [{"layer": i, "pairs": {}, "score": s} for i, s in enumerate(scores)],
    }
