import re

import pytest
import torch

from tests.tiny import tiny_bundle
from trainer.models import load_tokenizer
from trainer.tokens import (LANGUAGE_NAMES, blocked_tokens, candidate_identifiers, english_words, identifier_warnings,
                            known_words, prior_strength, rank_identifiers, token_pool)

LATENT = 8  # small probes keep the tiny UNet fast; the default (32) is for real checkpoints


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("sd1")


@pytest.fixture(scope="module")
def pool(tokenizer):
    return token_pool(tokenizer)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tokenization_facts(family):
    tokenizer = load_tokenizer(family)
    assert tokenizer("a sks dog").input_ids == [49406, 320, 48136, 1929, 49407]
    assert tokenizer.convert_ids_to_tokens(48136) == "sks</w>"


def test_word_lists_and_blocklist_load():
    words, known, blocked = english_words(), known_words(), blocked_tokens()
    assert {"dog", "the", "red", "cat", "john", "paris"} <= words
    assert not any(word.startswith("#") for word in words)
    assert len(known) > 100_000 and all(re.fullmatch(r"[a-z]{2,5}", word) for word in known)
    assert known["fiets"][0] == "nl" and known["perro"][0] == "es" and "de" in known["hund"]
    assert known["joao"][0] == "pt" and known["pnw"] == ("en",)  # accents dropped; one language only
    assert all(1 <= len(languages) <= 3 for languages in known.values())
    assert {"sks", "ohwx", "ak", "usa", "lol", "nsfw", "nike", "dslr"} <= blocked
    assert not any(":" in token for token in blocked)


def test_pool_holds_only_fresh_single_tokens(tokenizer, pool):
    assert len(pool) > 1000  # room for pick-token's 200 candidates, and for 3-token identifiers
    vocab = tokenizer.get_vocab()
    words, known, blocked = english_words(), known_words(), blocked_tokens()
    for name in pool:
        assert re.fullmatch(r"[a-z]{2,5}", name), name
        assert name not in words and name not in known and name not in blocked, name
        token = vocab[name + "</w>"]
        assert ids(tokenizer, name) == [token], name
        assert ids(tokenizer, f"a {name} dog") == [320, token, 1929], name


def test_known_offenders_never_in_pool(pool):
    offenders = {"sks", "ohwx", "ak", "rpg", "usa", "us", "uk", "nba", "lol", "omg", "nsfw", "loli", "nike",
                 "dslr", "hdr", "bw"}
    real_words = {"dog", "the", "and", "cat", "red", "run", "john", "paris"}
    numbers = {"ii", "iii", "iv", "xiv", "mmx", "xx"}  # Roman numerals; digits cannot pass the letters-only rule
    elongated = {"hmmmm", "aaaah", "xxxxx"}
    vowelless = {"tmrw", "wknd", "nhq", "mcfc"}  # acronyms, hashtags, shorthand
    assert not pool & (offenders | real_words | numbers | elongated | vowelless)


# Single CLIP tokens that an English word list lets through (the pool held them all before the multilingual one).
FOREIGN_WORDS = {
    "es": "gato hola mucho todo pero calle fotos noche nada agua fuego queso mundo ahora todos vamos",
    "fr": "merci avec sont dans vous bien tres homme ville jour nuit mais rien toi elle",
    "de": "haus auch aber doch stadt nacht ich wir und alles liebe zeit mein",
    "it": "bello sono anche notte bene amore mondo",
    "pt": "nao onde bom pai mais ela ele feliz pra mundo",
    "nl": "ook maar stad nacht het een voor wel hier wie",
}
FIRST_NAMES_AND_SURNAMES = "joao luca yuki zhang ying priya lukas mateo hiro akira hana minh kumar pavel"
ABBREVIATIONS = "maths elo pnw diy nyfw hmu ftw wip pdx atx socal icymi tmrw wknd hbd mcfc ncwx"


@pytest.mark.parametrize("sample", [*FOREIGN_WORDS.values(), FIRST_NAMES_AND_SURNAMES, ABBREVIATIONS],
                         ids=[*FOREIGN_WORDS, "names", "abbreviations"])
def test_no_word_of_a_major_language_in_pool(tokenizer, pool, sample):
    vocab = tokenizer.get_vocab()
    for name in sample.split():
        assert ids(tokenizer, name) == [vocab[name + "</w>"]], f"{name} is not one CLIP token: the sample is moot"
    assert not pool & set(sample.split())


PICK_ADVICE = "`python -m trainer pick-token` or the Pick Rare Token node"


def test_every_language_code_has_a_name():
    assert {code for codes in known_words().values() for code in codes} == LANGUAGE_NAMES.keys()


@pytest.mark.parametrize("identifier, expected", [
    ("sks", ["'sks' is blocked (tutorials)", "SKS rifle"]),
    ("SKS", ["'sks' is blocked"]),  # CLIP lower-cases, so does the check
    ("dog", ["'dog' is a real word", "in the English dictionary (SCOWL) and used in Danish, English and Swedish text"]),
    ("perro", ["'perro' is a real word", "Spanish", "(wordfreq)"]),
    ("pnw", ["'pnw' is a real word, name or abbreviation: used in English text (wordfreq)"]),
    ("joao", ["Portuguese"]),
    ("usa", ["'usa' is blocked (countries_3)"]),
    ("xciv", ["'xciv' is a Roman numeral"]),
    ("tmrw", ["'tmrw' has no vowel"]),
    ("x", ["'x' is a single letter"]),
    ("", ["The identifier is empty"]),
])
def test_identifier_warnings_say_why_and_what_to_do(identifier, expected):
    (warning,) = identifier_warnings(identifier)
    for text in expected:
        assert text in warning
    assert warning.endswith(f"Pick a rare identifier with {PICK_ADVICE}.")


def test_identifier_warnings_check_each_part_once():
    warnings = identifier_warnings("zwx dog dog")
    assert len(warnings) == 2 and "'zwx' has no vowel" in warnings[0] and "'dog' is a real word" in warnings[1]


def test_identifier_warnings_with_the_tokenizer(tokenizer):
    (too_long,) = identifier_warnings("ators ction ified ghue", tokenizer)  # four pool tokens
    assert "is 4 CLIP tokens (ators ction ified ghue); rare identifiers are 1 to 3 tokens" in too_long
    (split,) = identifier_warnings("qazeqixu", tokenizer)
    assert re.search(r"'qazeqixu' is [4-9] CLIP tokens", split)
    (whole_word,) = identifier_warnings("golden", tokenizer)
    assert "'golden' is a whole word of CLIP's vocabulary" in whole_word
    assert identifier_warnings("golden") == []  # without the tokenizer only the 2-5 letter lists can say


def test_pool_tokens_draw_no_warning(tokenizer, pool):
    assert [name for name in sorted(pool) if identifier_warnings(name, tokenizer)] == []
    for identifier in candidate_identifiers(tokenizer, count=30, seed=2, max_tokens=3):
        assert identifier_warnings(identifier, tokenizer) == [], identifier


def test_candidates_deterministic_for_seed(tokenizer, pool):
    first = candidate_identifiers(tokenizer, count=20, seed=7)
    assert first == candidate_identifiers(tokenizer, count=20, seed=7)
    assert first != candidate_identifiers(tokenizer, count=20, seed=8)
    assert len(set(first)) == 20 and set(first) <= pool


def test_candidates_of_up_to_three_tokens(tokenizer, pool):
    identifiers = candidate_identifiers(tokenizer, count=30, seed=1, max_tokens=3)
    parts = [identifier.split(" ") for identifier in identifiers]
    assert {len(part) for part in parts} == {1, 2, 3}
    flat = [name for part in parts for name in part]
    assert len(flat) == len(set(flat)) and set(flat) <= pool
    for identifier, part in zip(identifiers, parts):
        assert ids(tokenizer, f"a {identifier} dog") == [320, *(ids(tokenizer, name)[0] for name in part), 1929]
    with pytest.raises(ValueError, match="max_tokens"):
        candidate_identifiers(tokenizer, count=1, seed=0, max_tokens=4)


@pytest.fixture(scope="module")
def sd1_bundle():
    return tiny_bundle("sd1")


def test_ranking_sorted_and_deterministic(sd1_bundle):
    candidates = candidate_identifiers(sd1_bundle.tokenizer, count=6, seed=3) + ["sks"]
    ranked = rank_identifiers(sd1_bundle, candidates, "dog", latent_size=LATENT)
    assert sorted(token.identifier for token in ranked) == sorted(candidates)
    assert [token.strength for token in ranked] == sorted(token.strength for token in ranked)
    assert ranked == rank_identifiers(sd1_bundle, candidates, "dog", latent_size=LATENT)
    assert next(token for token in ranked if token.identifier == "sks").token_ids == (48136,)
    other_seed = rank_identifiers(sd1_bundle, candidates, "dog", seed=1, latent_size=LATENT)
    assert [token.strength for token in other_seed] != [token.strength for token in ranked]


def test_shortlist_keeps_weakest_by_text_shift(sd1_bundle):
    candidates = candidate_identifiers(sd1_bundle.tokenizer, count=6, seed=4)
    everything = rank_identifiers(sd1_bundle, candidates, "dog", latent_size=LATENT)
    shortlisted = rank_identifiers(sd1_bundle, candidates, "dog", shortlist=2, latent_size=LATENT)
    weakest_text = sorted(everything, key=lambda token: token.text_shift)[:2]
    assert {token.identifier for token in shortlisted} == {token.identifier for token in weakest_text}


def test_prior_strength_matches_ranking(sd1_bundle):
    (ranked,) = rank_identifiers(sd1_bundle, ["sks"], "dog", latent_size=LATENT)
    assert prior_strength(sd1_bundle, "sks", "dog", latent_size=LATENT) == pytest.approx(ranked.strength, rel=1e-6)
    assert ranked.strength > 0
    assert rank_identifiers(sd1_bundle, [], "dog") == []


# --- the measure measures: constructed tokens with known effect -------------------------------------------------------

def embedding_row(bundle, name):
    return bundle.text_encoder.get_input_embeddings().weight[ids(bundle.tokenizer, name)[0]]


def encoder_layers(bundle):
    return [module for module in bundle.text_encoder.modules() if type(module).__name__ == "CLIPEncoderLayer"]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@torch.no_grad()
def test_token_aligned_with_strongest_write_ranks_last(family):
    """A pre-LayerNorm encoder sees only an embedding's direction, so 'huge' alone means nothing. Point the row along
    the direction the first attention layer writes most strongly into later positions (top right-singular vector of
    out_proj @ v_proj), scaled up so the position embedding does not dilute it: every state after it moves a lot."""
    bundle = tiny_bundle(family)
    candidates = candidate_identifiers(bundle.tokenizer, count=8, seed=0)
    attention = encoder_layers(bundle)[0].self_attn
    direction = torch.linalg.svd(attention.out_proj.weight @ attention.v_proj.weight).Vh[0]
    embedding_row(bundle, candidates[0]).copy_(1000 * (direction - direction.mean()))
    ranked = rank_identifiers(bundle, candidates, "dog", latent_size=LATENT)
    assert ranked[-1].identifier == candidates[0]
    assert ranked[-1].strength > 1.5 * ranked[-2].strength
    assert max(ranked, key=lambda token: token.text_shift).identifier == candidates[0]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@torch.no_grad()
def test_token_the_model_cannot_see_ranks_first(family):
    """Without token mixing (attention and MLP outputs zeroed) and without position embeddings each state depends on
    its own token only, and the UNet's cross-attention is blind to order. A token whose row copies the padding row
    then leaves what the UNet sees unchanged: "a [V] dog <pad>..." holds the same states as "a dog <pad> <pad>...".
    Its strength must be ~0 while ordinary tokens are clearly above 0, and with correct alignment every text shift
    is ~0 (only the class-noun-onwards states are compared, and none of them changed)."""
    bundle = tiny_bundle(family)
    for layer in encoder_layers(bundle):
        for projection in (layer.self_attn.out_proj, layer.mlp.fc2):
            projection.weight.zero_()
            projection.bias.zero_()
    embeddings = next(m for m in bundle.text_encoder.modules() if type(m).__name__ == "CLIPTextEmbeddings")
    embeddings.position_embedding.weight.zero_()
    candidates = candidate_identifiers(bundle.tokenizer, count=8, seed=0)
    pad_row = bundle.text_encoder.get_input_embeddings().weight[bundle.tokenizer.pad_token_id]
    embedding_row(bundle, candidates[0]).copy_(pad_row)
    ranked = rank_identifiers(bundle, candidates, "dog", latent_size=LATENT)
    assert ranked[0].identifier == candidates[0]
    assert ranked[0].strength < 1e-3 and ranked[1].strength > 0.1
    assert all(token.text_shift < 1e-6 for token in ranked)
