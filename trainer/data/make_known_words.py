"""Regenerates known_words.txt and known_words.LICENSE beside this file from wordfreq's multilingual word frequencies.

wordfreq is only needed here, not by the pack at run time (it is no longer updated and its data is large):

    python -m venv /tmp/wordfreq && /tmp/wordfreq/bin/pip install wordfreq==3.1.1
    /tmp/wordfreq/bin/python trainer/data/make_known_words.py

A word is kept when, written in plain ASCII letters (accents dropped: "joão" -> "joao"), it is 2-5 letters long, the
only length an identifier token can have, and one of wordfreq's languages uses it at least once per 100 million words.
"""
import math
import re
import unicodedata
from importlib.metadata import metadata, version
from pathlib import Path

from wordfreq import available_languages, get_frequency_dict

HERE = Path(__file__).parent
ZIPF_MIN = 2.0  # log10 of uses per billion words: 2.0 keeps rare abbreviations (pnw is 2.4 in English)
LANGUAGES_SHOWN = 3
# Letters that Unicode decomposition leaves alone, as people write them without a special keyboard.
PLAIN_LETTERS = str.maketrans({"ł": "l", "ø": "o", "đ": "d", "ı": "i", "ß": "ss", "æ": "ae", "œ": "oe", "þ": "th",
                               "ð": "d"})


def main() -> None:
    zipf = {}  # word -> language -> Zipf frequency of all its spellings
    for language in sorted(available_languages("best")):
        totals = {}
        for spelling, frequency in get_frequency_dict(language, "best").items():
            word = ascii_form(spelling)
            if re.fullmatch(r"[a-z]{2,5}", word):
                totals[word] = totals.get(word, 0.0) + frequency
        for word, frequency in totals.items():
            if math.log10(frequency) + 9 >= ZIPF_MIN:
                zipf.setdefault(word, {})[language] = math.log10(frequency) + 9
    lines = [" ".join([word, *sorted(by_language, key=lambda lang: (-by_language[lang], lang))[:LANGUAGES_SHOWN]])
             for word, by_language in sorted(zipf.items())]
    (HERE / "known_words.txt").write_text(header(len(lines)) + "\n".join(lines) + "\n", encoding="utf-8")
    (HERE / "known_words.LICENSE").write_text(notice(), encoding="utf-8")


def ascii_form(spelling: str) -> str:
    decomposed = unicodedata.normalize("NFKD", spelling.lower().translate(PLAIN_LETTERS))
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def header(count: int) -> str:
    return (f"# {count} words, names and abbreviations of 2-5 letters that some language uses at least once\n"
            f"# per 100 million words (Zipf frequency >= {ZIPF_MIN}) in wordfreq {version('wordfreq')}, written in\n"
            f"# plain ASCII letters (accents dropped). After each word, the wordfreq language codes where it is\n"
            f"# most frequent (up to {LANGUAGES_SHOWN}). Made by make_known_words.py beside this file.\n"
            f"# Data derived from wordfreq by Robyn Speer, CC BY-SA 4.0: see known_words.LICENSE.\n")


def notice() -> str:
    """The licence and attributions wordfreq's own documentation gives for its data."""
    readme = metadata("wordfreq").get_payload()
    license_part = readme[readme.index("## License"):readme.index("## Citing wordfreq")]
    citations = readme[readme.index("## Citations to work that wordfreq is built on"):]
    return (f"known_words.txt is derived from the word frequencies of wordfreq {version('wordfreq')}\n"
            "(https://github.com/rspeer/wordfreq, by Robyn Speer) by make_known_words.py: words folded to ASCII,\n"
            "kept by length and frequency, and annotated with their most frequent languages. known_words.txt is\n"
            "licensed under the Creative Commons Attribution-ShareAlike 4.0 license,\n"
            "https://creativecommons.org/licenses/by-sa/4.0/ (the rest of this project stays under its MIT license).\n"
            "wordfreq's notice about its data follows.\n\n"
            + license_part.strip() + "\n\n" + citations.strip() + "\n")


if __name__ == "__main__":
    main()
