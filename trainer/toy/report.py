"""Train and measure DreamBooth on the toy world in the paper's settings; write a markdown table and image grids.

    python -m trainer.toy.report --out toy_report

Rows: the base model; DreamBooth with and without prior preservation (the paper's Table 3); correct, wrong and no
class noun (Table 4; all three without prior preservation, so the noun is the only difference); the rare identifier
against a common word of this world; and a sweep over training steps, with and without prior preservation, measured
inside one run each (the learning rate is constant, so step k of the long run is a k-step run).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..bundle import ModelBundle
from ..models import load_model
from . import experiment as ex
from .evaluators import load_evaluators

SWEEP = [50, 100, 200, 400, 800, 1600]


def _cell(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"


def _table(rows: list[tuple[str, str, ex.Scores]]) -> str:
    lines = ["| setting | prompt | " + " | ".join(ex.COLUMNS) + " |", "|---|---|" + "---|" * len(ex.COLUMNS)]
    lines += [f"| {name} | `{prompt}` | " + " | ".join(_cell(v) for v in scores.row()) + " |"
              for name, prompt, scores in rows]
    return "\n".join(lines)


class Report:
    def __init__(self, out: Path, seeds: int, base: Path):
        self.out, self.base = out, base
        self.seeds = list(range(seeds))
        self.evaluators = load_evaluators()
        self.started = time.monotonic()
        (out / "grids").mkdir(parents=True, exist_ok=True)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {message}", flush=True)

    def score(self, name: str, bundle, variant: ex.Variant) -> ex.Scores:
        scores, samples = ex.measure(bundle, self.evaluators, variant, self.seeds)
        ex.samples_grid(samples).save(self.out / "grids" / f"{name}.png")
        self.log(f"{name}: " + ", ".join(f"{c} {_cell(v)}" for c, v in zip(ex.COLUMNS, scores.row())))
        return scores

    def run_variant(self, variant: ex.Variant) -> tuple[ex.Scores, ModelBundle]:
        self.log(f"training {variant}")
        bundle = ex.train_variant(variant, self.out / "runs", base=self.base)
        return self.score(variant.name, bundle, variant), bundle

    def binding(self, bundle, variant: ex.Variant) -> list[tuple[str, str, float]]:
        """Subject fidelity on the recontextualization prompts with the trained identifier, without one, and with
        other words the training never saw."""
        rows = []
        for identifier in (variant.identifier, "", *ex.RUNNERS_UP):
            other = replace(variant, identifier=identifier)
            scores, _ = ex.measure(bundle, self.evaluators, other, self.seeds, kinds=("recontextualization",),
                                   with_common_word=False)
            label = {variant.identifier: "the trained identifier", "": "no identifier"}.get(identifier, "unseen word")
            rows.append((label, other.prompt("a {V} star"), scores.subject_fidelity_recontext))
        return rows

    def sweep(self, variant: ex.Variant) -> list[tuple[int, ex.Scores]]:
        results = []

        def visit(step):
            results.append((step, self.score(f"{variant.name}-step{step}", bundle, variant)))

        self.log(f"sweep {variant}")
        bundle = load_model(self.base)
        ex.train_variant(replace(variant, name=f"{variant.name}-sweep", steps=max(SWEEP)), self.out / "runs",
                         bundle=bundle, callbacks=ex.AtSteps(SWEEP, visit))
        return results


def build(out: Path, seeds: int = 8, base: Path = ex.BASE) -> Path:
    report = Report(out, seeds, base)
    ppl = ex.Variant("ppl")
    no_ppl = ex.Variant("no-ppl", prior=False)
    wrong = ex.Variant("wrong-noun", class_noun=ex.WRONG_NOUN, prior=False)
    no_noun = ex.Variant("no-noun", class_noun="", prior=False)
    common = ex.Variant("common-word", identifier=ex.COMMON_WORD)

    base_scores = report.score("base", load_model(base), ppl)
    trained = {v.name: report.run_variant(v) for v in (ppl, no_ppl, wrong, no_noun, common)}
    by_name = {name: scores for name, (scores, _) in trained.items()}
    binding = report.binding(trained["ppl"][1], ppl)
    sweeps = {v.name: report.sweep(v) for v in (ppl, no_ppl)}

    def row(label, variant, scores):
        return label, variant.prompt("a {V} star"), scores

    text = [
        "# DreamBooth on the toy world",
        "",
        f"Base model `{base.name}`; subject: the toy world's marked star (5 training views, 8 held-out views); "
        f"identifier `{ex.RARE_IDENTIFIER}`; {ppl.steps} steps at learning rate {ppl.learning_rate:g}, "
        f"{ppl.num_class_images} class images; {len(report.seeds)} samples per prompt (seeds 0-{len(report.seeds) - 1}, "
        f"DDIM {ex.SAMPLING['steps']} steps, guidance {ex.SAMPLING['guidance']}). For scale: the real training photos "
        f"score subject fidelity {ex.real_image_fidelity(report.evaluators):.3f} against the held-out views; the "
        f"held-out views after the base model's VAE (encode, decode) score "
        f"{ex.autoencoded_fidelity(load_model(base), report.evaluators):.3f}.",
        "",
        "Made by `python -m trainer.toy.report` in "
        f"{(time.monotonic() - report.started) / 60:.1f} min. Measures (trainer/toy/evaluators.py): subject "
        "fidelity = identity-embedding cosine to the held-out views (the paper's DINO); prompt fidelity = attribute "
        "agreement with what the prompt names (CLIP-T); PRES = identity similarity of plain `a star` samples to the "
        "subject (lower = less language drift); DIV = perceptual distance among samples of one prompt (LPIPS); "
        f"'{ex.COMMON_WORD}' kept = attribute agreement on ordinary prompts using the word '{ex.COMMON_WORD}'.",
        "",
        "## Prior preservation (paper Table 3)",
        "",
        _table([row("base model", ppl, base_scores), row("DreamBooth, prior preservation", ppl, by_name["ppl"]),
                row("DreamBooth, no prior preservation", no_ppl, by_name["no-ppl"])]),
        "",
        "## Class noun (paper Table 4; no prior preservation in all three)",
        "",
        _table([row("correct class noun", no_ppl, by_name["no-ppl"]),
                row("wrong class noun", wrong, by_name["wrong-noun"]),
                row("no class noun", no_noun, by_name["no-noun"])]),
        "",
        "## Rare identifier vs a common word (prior preservation)",
        "",
        _table([row(f"rare `{ex.RARE_IDENTIFIER}`", ppl, by_name["ppl"]),
                row(f"common `{ex.COMMON_WORD}`", common, by_name["common-word"])]),
        "",
    ]
    text += ["## How specific is the binding (prior preservation run)", "",
             "| prompt words | prompt | subject fidelity (recontext.) ↑ |", "|---|---|---|"]
    text += [f"| {label} | `{prompt}` | {value:.3f} |" for label, prompt, value in binding]
    text += [""]
    for variant in (ppl, no_ppl):
        text += [f"## Training steps: {variant.name}", "",
                 _table([(f"{step} steps", variant.prompt("a {V} star"), scores)
                         for step, scores in sweeps[variant.name]]), ""]
    text += ["## Grids", "", "One row per prompt (the evaluation prompts, then `a star`, then the "
             f"'{ex.COMMON_WORD}' prompts), one column per seed.", ""]
    for path in sorted((out / "grids").glob("*.png")):
        text.append(f"- {path.stem}: ![{path.stem}](grids/{path.name})")
    destination = out / "report.md"
    destination.write_text("\n".join(text) + "\n")
    report.log(f"wrote {destination}")
    return destination


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("toy_report"), help="folder for report.md and grids/")
    parser.add_argument("--seeds", type=int, default=8, help="samples per prompt (8)")
    parser.add_argument("--base", type=Path, default=ex.BASE, help="base model (the shipped toy base)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    build(args.out, args.seeds, args.base)


if __name__ == "__main__":
    main()
