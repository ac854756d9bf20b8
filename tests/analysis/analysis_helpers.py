"""Word lists and random documents for the LayerMoE analysis tests (imported by name; not a conftest)."""

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
