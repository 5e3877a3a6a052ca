"""The prompts of a DreamBooth run, built in one place: "a [V] [class noun]" captions the photos, "a [class noun]"
the class images (the paper's templates), with "an" before a vowel ("an icz star")."""
from __future__ import annotations


def with_article(phrase: str, article: str | None = None) -> str:
    """`phrase` after "a" or "an" as its first letter asks, or after `article` when given."""
    phrase = " ".join(phrase.split())
    return f"{article or ('an' if phrase[:1].lower() in ('a', 'e', 'i', 'o', 'u') else 'a')} {phrase}"


def instance_prompt(identifier: str, class_noun: str, article: str | None = None) -> str:
    return with_article(f"{identifier} {class_noun}", article)


def class_prompt(class_noun: str, article: str | None = None) -> str:
    return with_article(class_noun, article)
