from trainer.config import TrainConfig
from trainer.prompts import class_prompt, instance_prompt


def test_prompts_take_the_article_their_first_letter_asks_for():
    assert instance_prompt("zwx", "dog") == "a zwx dog"
    assert instance_prompt("icz", "star") == "an icz star"
    assert class_prompt("  old   teapot ") == "an old teapot"
    assert class_prompt("Eagle") == "an Eagle" and class_prompt("backpack") == "a backpack"
    assert instance_prompt("icz", "star", article="a") == "a icz star"  # the token probe holds the article fixed


def test_a_run_captions_its_photos_and_class_images_with_them():
    cfg = TrainConfig(identifier="ogv", class_noun="owl")
    assert (cfg.instance_prompt, cfg.class_prompt) == ("an ogv owl", "an owl")
    assert TrainConfig(identifier="zwx", class_noun="dog", instance_prompt="photo of zwx").instance_prompt == \
        "photo of zwx"
