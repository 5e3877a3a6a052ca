"""Rare-token identifiers for DreamBooth: candidates from the CLIP BPE vocabulary, ranked by a measured prior.

Candidates are word-final vocabulary tokens ("...</w>") of 2-5 lowercase ASCII letters that tokenize back to
themselves (alone and in "a X dog") and are not words, names or abbreviations of any language wordfreq covers
(trainer/data/known_words.txt, accents dropped), English dictionary words (trainer/data/english_words.txt, which
also holds the rare ones a frequency list misses), Roman numerals, elongations ("hmmmm"), without a vowel (acronyms,
hashtags and texting shorthand: "tmrw", "nhq") or blocked (trainer/data/blocked_tokens.txt: sks and other short
tokens with a known meaning). `identifier_warnings` applies the same rules to an identifier a user typed.
An identifier of several tokens joins them with spaces, so each keeps its own token.

Prior strength, measured on the loaded checkpoint, answers: how differently does the model draw "a [V] [class]" from
"a [class]"? It is the denoiser shift

    strength = sqrt( sum_p ||f(x_p, t_p, "a [V] [class]") - f(x_p, t_p, "a [class]")||^2
                   / sum_p ||f(x_p, t_p, "a [class]")  - f(x_p, t_p, "")||^2 )

where f is the UNet's prediction (epsilon or v, whatever the checkpoint predicts) and the probes p are fixed seeded
noised latents at a few timesteps. The denominator is the effect of the whole class prompt over the empty prompt, so
the number is scale-free across timesteps and checkpoints: 0 means [V] changes nothing, 1 means it moves the model as
much as naming the class did. This is exactly what a strong prior does (sks turns dogs into rifles) and what training
has to overcome; a token with a weak prior lets the subject take the identifier over with little language drift.

A cheaper text-encoder shift (mean 1 - cosine similarity between the encoder states of the two prompts, aligned from
the class noun onwards: class tokens, end token and padding, the states the UNet cross-attends to; the earlier
positions are identical under CLIP's causal mask) is computed for every candidate first; with `shortlist` only the
weakest ones by that measure go on to the UNet, which is what a large candidate pool costs on a real checkpoint.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .conditioning import Conditioning, encode, time_ids, tokenize
from .prompts import class_prompt, instance_prompt

DATA_DIR = Path(__file__).parent / "data"
WORD_FINAL = "</w>"
# Roman numerals are numbers even when written with letters ("iii", "xiv", "mmx").
ROMAN_NUMERAL = re.compile(r"m{0,4}(cm|cd|d?c{0,3})(xc|xl|l?x{0,3})(ix|iv|v?i{0,3})")
# A letter three times in a row is an elongated interjection or tag ("hmmmm", "aaaah", "xxxxx"), not a fresh token.
ELONGATED = re.compile(r"(.)\1\1")
# A vocabulary token without a vowel is an acronym, a hashtag or texting shorthand ("tmrw", "wknd", "mcfc"): word
# lists miss many of them, yet BPE only made each a token because captions use it often.
VOWELLESS = re.compile(r"[^aeiouy]+")
# The DreamBooth paper's rare identifiers are sequences of 1 to 3 tokens.
MAX_IDENTIFIER_TOKENS = 3
PICK_ADVICE = "Pick a rare identifier with `python -m trainer pick-token` or the Pick Rare Token node."
# wordfreq's language codes, as known_words.txt gives them.
LANGUAGE_NAMES = {
    "ar": "Arabic", "bg": "Bulgarian", "bn": "Bangla", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "fa": "Persian", "fi": "Finnish", "fil": "Filipino",
    "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian", "is": "Icelandic",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian", "mk": "Macedonian",
    "ms": "Malay", "nb": "Norwegian", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "sh": "Serbo-Croatian", "sk": "Slovak", "sl": "Slovenian", "sv": "Swedish", "ta": "Tamil",
    "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
}
# Fixed probes for the denoiser shift: a few timesteps spanning coarse (layout) to fine (texture) denoising.
PROBE_TIMESTEPS = (250, 500, 750)


@dataclass(frozen=True)
class RankedToken:
    identifier: str
    strength: float  # denoiser shift, see the module docstring (lower is a weaker prior)
    token_ids: tuple[int, ...]
    text_shift: float  # text-encoder shift, the cheap pre-filter


def candidate_identifiers(tokenizer, *, count: int, seed: int, max_tokens: int = 1) -> list[str]:
    """`count` distinct identifiers drawn from the candidate pool by a seeded shuffle of the sorted pool; with
    max_tokens > 1 each identifier joins 1..max_tokens pool tokens (seeded too) with spaces."""
    if not 1 <= max_tokens <= MAX_IDENTIFIER_TOKENS:
        raise ValueError(f"max_tokens must be 1, 2 or 3 (identifiers of up to three tokens), got {max_tokens}")
    pool = sorted(token_pool(tokenizer))
    rng = random.Random(seed)
    rng.shuffle(pool)
    lengths = [rng.randint(1, max_tokens) for _ in range(count)]
    if sum(lengths) > len(pool):
        raise ValueError(f"count={count} needs {sum(lengths)} distinct tokens but the pool has {len(pool)}")
    tokens = iter(pool)
    return [" ".join(next(tokens) for _ in range(length)) for length in lengths]


def token_pool(tokenizer) -> set[str]:
    """Every single token usable as (part of) an identifier."""
    vocab = tokenizer.get_vocab()
    names = [token[: -len(WORD_FINAL)] for token in vocab if _is_short_word_token(token)]
    return _round_trips(tokenizer, [name for name in names if rejection_reason(name) is None], vocab)


def rejection_reason(name: str) -> str | None:
    """Why the lowercase letters `name` are never a candidate token, or None."""
    if name in _blocked_groups():
        group, why = _blocked_groups()[name]
        return f"'{name}' is blocked ({group}): {why}"
    lists = []
    if name in english_words():
        lists.append("in the English dictionary (SCOWL)")
    if name in known_words():
        lists.append(f"used in {_language_names(known_words()[name])} text (wordfreq)")
    if lists:
        return f"'{name}' is a real word, name or abbreviation: {' and '.join(lists)}"
    if ROMAN_NUMERAL.fullmatch(name):
        return f"'{name}' is a Roman numeral"
    if ELONGATED.search(name):
        return f"'{name}' repeats a letter three times, like interjections and tags (hmmmm, xxxxx)"
    if VOWELLESS.fullmatch(name):
        return f"'{name}' has no vowel: a vocabulary token without one is an acronym, hashtag or shorthand (tmrw, nhq)"
    return None


def identifier_warnings(identifier: str, tokenizer=None) -> list[str]:
    """Why an identifier a user typed is a poor choice, one sentence each with the fix; [] when nothing is known
    against it. Each space-separated part meets the candidate pool's rules (see `rejection_reason`); with the CLIP
    tokenizer the identifier's token count is checked too, and whether a part of 6+ letters is a whole word of the
    vocabulary (the word lists stop at 5 letters)."""
    words = identifier.lower().split()  # CLIP lower-cases too
    if not words:
        return [f"The identifier is empty. {PICK_ADVICE}"]
    reasons = []
    for part in dict.fromkeys(words):
        if re.fullmatch(r"[a-z]", part):
            reasons.append(f"'{part}' is a single letter, which captions use as an initial, article or label")
        elif re.fullmatch(r"[a-z]+", part) and (reason := rejection_reason(part)):
            reasons.append(reason)
    if tokenizer is not None:
        reasons += _tokenizer_reasons(tokenizer, words)
    return [f"{reason.rstrip('.')}. {PICK_ADVICE}" for reason in reasons]


def _tokenizer_reasons(tokenizer, words: list[str]) -> list[str]:
    reasons = []
    pieces = tokenizer.convert_ids_to_tokens(_ids(tokenizer, " ".join(words)))
    if len(pieces) > MAX_IDENTIFIER_TOKENS:
        shown = " ".join(piece.removesuffix(WORD_FINAL) for piece in pieces)
        reasons.append(f"'{' '.join(words)}' is {len(pieces)} CLIP tokens ({shown}); rare identifiers are 1 to "
                       f"{MAX_IDENTIFIER_TOKENS} tokens, as in the DreamBooth paper")
    for part in dict.fromkeys(words):
        if len(part) > 5 and tokenizer.convert_ids_to_tokens(_ids(tokenizer, part)) == [part + WORD_FINAL]:
            reasons.append(f"'{part}' is a whole word of CLIP's vocabulary: a word that long is one token only "
                           "because CLIP's training text used it often")
    return reasons


def _is_short_word_token(token: str) -> bool:
    return token.endswith(WORD_FINAL) and re.fullmatch(r"[a-z]{2,5}", token[: -len(WORD_FINAL)]) is not None


def _round_trips(tokenizer, names: list[str], vocab: dict[str, int]) -> set[str]:
    """Names that come back as their own single token, alone and in a prompt (BPE may split a written word
    differently from the vocabulary entry)."""
    alone = tokenizer(names, add_special_tokens=False).input_ids
    in_prompt = tokenizer([f"a {name} dog" for name in names], add_special_tokens=False).input_ids
    before, after = _ids(tokenizer, "a"), _ids(tokenizer, "dog")
    return {name for name, ids, prompt in zip(names, alone, in_prompt)
            if ids == [vocab[name + WORD_FINAL]] and prompt == before + ids + after}


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    return frozenset(_data_lines("english_words.txt"))


@lru_cache(maxsize=1)
def known_words() -> dict[str, tuple[str, ...]]:
    """Words, names and abbreviations of 2-5 letters that some language uses, each with the wordfreq language codes
    where it is most frequent; see trainer/data/make_known_words.py."""
    return {word: tuple(languages) for word, *languages in map(str.split, _data_lines("known_words.txt"))}


def _language_names(codes: tuple[str, ...]) -> str:
    names = [LANGUAGE_NAMES[code] for code in codes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def blocked_tokens() -> frozenset[str]:
    """All tokens of blocked_tokens.txt."""
    return frozenset(_blocked_groups())


@lru_cache(maxsize=1)
def _blocked_groups() -> dict[str, tuple[str, str]]:
    """token -> (group, why) from blocked_tokens.txt, whose lines "group: token token ..." each follow the comment
    that says why (a token in several groups keeps the first)."""
    groups, comment = {}, []
    for line in (DATA_DIR / "blocked_tokens.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#"):
            comment.append(line.lstrip("#").strip())
            continue
        if line:
            group, tokens = line.split(":", 1)
            for token in tokens.split():
                groups.setdefault(token, (group, " ".join(comment)))
        comment = []
    return groups


def _data_lines(name: str) -> list[str]:
    lines = (DATA_DIR / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def prior_strength(bundle, identifier: str, class_noun: str, *, seed: int = 0, latent_size: int | None = None
                   ) -> float:
    """Denoiser shift of `identifier` for `class_noun` on this checkpoint (see the module docstring)."""
    return rank_identifiers(bundle, [identifier], class_noun, seed=seed, latent_size=latent_size)[0].strength


@torch.no_grad()
def rank_identifiers(bundle, candidates: list[str], class_noun: str, *, seed: int = 0, shortlist: int | None = None,
                     latent_size: int | None = None, batch_size: int = 24) -> list[RankedToken]:
    """Candidates ranked weakest prior first (ties by name). With `shortlist`, only that many candidates with the
    smallest text-encoder shift are measured on the UNet and returned. `batch_size` bounds each model call (prompts
    per text-encoder call, samples per UNet call; a conditioning takes one sample per probe). Deterministic for a
    seed. The probe latents are `latent_size` square: by default the model's own size up to 32 (256 px in SD)."""
    if not candidates:
        return []
    latent_size = latent_size or min(32, bundle.unet.config.sample_size)
    # One article for all ("a"), so that what is measured is the identifier alone, not "a" turning into "an".
    reference = encode_prompts(bundle, [class_prompt(class_noun, "a"), ""], batch_size)
    states = encode_prompts(bundle, [instance_prompt(identifier, class_noun, "a") for identifier in candidates],
                            batch_size)
    token_ids = [tuple(_ids(bundle.tokenizer, identifier)) for identifier in candidates]
    class_start = 1 + len(_ids(bundle.tokenizer, "a"))  # after the start token and "a"
    text = [text_shift(reference.states[0], state, class_start, len(ids))
            for state, ids in zip(states.states, token_ids)]
    order = sorted(range(len(candidates)), key=lambda i: (text[i], candidates[i]))[:shortlist]
    strengths = denoiser_shifts(bundle, reference, states.rows(order), seed=seed, latent_size=latent_size,
                                batch_size=batch_size)
    ranked = [RankedToken(candidates[i], strength, token_ids[i], text[i]) for i, strength in zip(order, strengths)]
    return sorted(ranked, key=lambda token: (token.strength, token.identifier))


def encode_prompts(bundle, prompts: list[str], batch_size: int) -> Conditioning:
    """The UNet conditioning of each prompt (states [len(prompts), 77, width]), as the pipelines compute it."""
    ids = tokenize(bundle, prompts)
    chunks = [encode(bundle, [encoder_ids[start:start + batch_size] for encoder_ids in ids])
              for start in range(0, len(prompts), batch_size)]
    return Conditioning.cat(chunks)


def text_shift(reference: torch.Tensor, shifted: torch.Tensor, class_start: int, inserted: int) -> float:
    """Mean 1 - cosine similarity from the class noun on, position p of `reference` against p + inserted of
    `shifted` (the prompt with `inserted` identifier tokens before the class noun)."""
    aligned = reference.shape[0] - inserted
    similarity = torch.cosine_similarity(reference[class_start:aligned].float(),
                                         shifted[class_start + inserted:].float(), dim=-1)
    return (1 - similarity).mean().item()


def denoiser_shifts(bundle, reference: torch.Tensor, states: torch.Tensor, *, seed: int, latent_size: int,
                    batch_size: int) -> list[float]:
    """Denoiser shift of each conditioning in `states`; `reference` holds the class-prompt and empty-prompt ones."""
    latents, timesteps = probe_latents(bundle, seed, latent_size)
    # One pass over reference and candidates keeps the UNet batches the same shape (CPU backends re-plan per shape).
    class_prediction, empty_prediction, *predictions = predict(bundle.unet, latents, timesteps,
                                                               Conditioning.cat([reference, states]), batch_size)
    scale = (class_prediction - empty_prediction).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
    return [((prediction - class_prediction).pow(2).sum() / scale).sqrt().item() for prediction in predictions]


def probe_latents(bundle, seed: int, latent_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One seeded noised latent per probe timestep, drawn on the CPU so every device gets the same probes."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(PROBE_TIMESTEPS), bundle.unet.config.in_channels, latent_size, latent_size)
    clean, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    timesteps = torch.tensor(PROBE_TIMESTEPS)
    noisy = bundle.noise_scheduler.add_noise(clean, noise, timesteps)
    return noisy.to(bundle.unet.device, bundle.unet.dtype), timesteps.to(bundle.unet.device)


def predict(unet, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
            batch_size: int) -> torch.Tensor:
    """UNet predictions for every (conditioning, probe) pair, [len(states), probes, C, H, W] in float32. SDXL's
    time ids say the probes are whole, uncropped images of their size."""
    count, probes = cond.states.shape[0], latents.shape[0]
    pixels = latents.shape[-1] * 8
    size_ids = time_ids((pixels, pixels), (0, 0), (pixels, pixels))
    rows = [row for row in range(count) for _ in range(probes)]
    all_latents, all_timesteps = latents.repeat(count, 1, 1, 1), timesteps.repeat(count)
    outputs = []
    for start in range(0, count * probes, batch_size):
        chunk = rows[start:start + batch_size]
        part = cond.rows(chunk).to(unet.device, unet.dtype)
        x, t = all_latents[start:start + batch_size], all_timesteps[start:start + batch_size]
        outputs.append(unet(x, t, **part.unet_kwargs(size_ids.expand(len(chunk), -1))).sample.float())
    return torch.cat(outputs).unflatten(0, (count, probes))
