"""A miniature of the paper's task suite, in the world of TinyStories (what stories260K knows).

One task per category of the paper, generated deterministically from a seed,
written as LLM-Adapters records so the same loaders and scorers apply:

    story-qa      commonsense-style: a question about a short story, three options
                  listed as the label words, "Answer format: red/blue/green",
                  answered "the correct answer is blue"              (label, chance 1/3)
    story-math    math-style word problem with a short rationale,
                  "... The answer is 7."                             (number)
    story-summary a one-sentence summary of a three-sentence story   (ROUGE-L)

The pretrained model cannot do any of them from the prompt alone (its scores sit
at chance or near zero); a few hundred adapter steps teach them.
"""

from __future__ import annotations

import random
from typing import Any

NAMES = ["Lily", "Tom", "Sue", "Max", "Anna", "Ben", "Mia", "Sam", "Lucy", "Tim"]
OBJECTS = ["ball", "kite", "car", "doll", "hat", "box", "cup", "bird", "book", "boat"]
COLORS = ["red", "blue", "green", "yellow", "pink", "big", "small", "shiny"]
PLACES = ["park", "garden", "beach", "forest", "house", "school", "shop", "lake"]
FRUITS = ["apples", "cookies", "toys", "flowers", "rocks", "candies"]
FRIENDS = ["mom", "dad", "dog", "cat", "friend", "sister", "brother"]
TASKS = {"story-qa": "label", "story-math": "number", "story-summary": "rouge"}


def _cast(rng: random.Random) -> tuple[str, str, str, str, str]:
    """Who, what, where, with whom, and the thing's colour: one story's elements."""
    name, obj, place, friend = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(FRIENDS)
    return name, obj, place, friend, rng.choice(COLORS)


def _qa(rng: random.Random) -> dict[str, Any]:
    name, obj, place, friend, color = _cast(rng)
    story = (
        f"{name} had a {color} {obj}. One day, {name} went to the {place} with the {friend}. "
        f"{name} played with the {obj} all day and was very happy."
    )
    kind = rng.choice(["color", "place"])
    pool, gold = (COLORS, color) if kind == "color" else (PLACES, place)
    options = rng.sample([p for p in pool if p != gold], 2) + [gold]
    rng.shuffle(options)
    question = f"What color was the {obj}?" if kind == "color" else f"Where did {name} go?"
    # The options are the label words themselves, as BoolQ's true/false are: a model this small
    # learns to copy a word from the prompt in a few hundred steps, not to map a position to an index.
    instruction = f"{story}\n\nQuestion: {question}\n\nAnswer format: {'/'.join(options)}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {gold}", "answer": gold}


def _math(rng: random.Random) -> dict[str, Any]:
    name, thing = rng.choice(NAMES), rng.choice(FRUITS)
    a = rng.randint(2, 9)
    if rng.random() < 0.5:
        b = rng.randint(1, 9)
        text = f"{name} had {a} {thing}. Then {name} found {b} more {thing}. How many {thing} does {name} have now?"
        rationale, answer = f"{name} had {a} {thing} and found {b} more. {a} + {b} = {a + b}.", a + b
    else:
        b = rng.randint(1, a - 1)
        text = f"{name} had {a} {thing}. {name} gave {b} {thing} to a friend. How many {thing} does {name} have now?"
        rationale, answer = f"{name} had {a} {thing} and gave away {b}. {a} - {b} = {a - b}.", a - b
    output = f"{rationale} The answer is {answer}."
    return {"instruction": text, "input": "", "output": output, "answer": f"{answer}.0"}


def _summary(rng: random.Random) -> dict[str, Any]:
    name, obj, place, friend, color = _cast(rng)
    story = (
        f"One day, {name} and the {friend} went to the {place}. "
        f"At the {place}, {name} saw a {color} {obj} under a tree. "
        f"{name} picked up the {obj} and took it home."
    )
    summary = f"{name} found a {color} {obj} at the {place}."
    return {"instruction": "Summarize the story in one sentence.", "input": story, "output": summary, "answer": summary}


MAKERS = {"story-qa": _qa, "story-math": _math, "story-summary": _summary}


def make_task(name: str, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` records of task `name`, deterministic in `seed`."""
    if name not in MAKERS:
        raise ValueError(f"task: unknown {name!r}; accepted: {', '.join(MAKERS)}")
    rng = random.Random(f"{name}:{seed}")
    return [MAKERS[name](rng) for _ in range(n)]


def make_splits(n_train: int, n_test: int, seed: int = 0) -> tuple[dict[str, list], dict[str, list]]:
    """Train and held-out test records per task; test prompts never occur in training."""
    train, test = {}, {}
    for name in MAKERS:
        train[name] = make_task(name, n_train, seed)
        seen = {r["instruction"] + r["input"] for r in train[name]}
        candidates = make_task(name, 4 * n_test + 50, seed + 10_000)
        test[name] = [r for r in candidates if r["instruction"] + r["input"] not in seen][:n_test]
    return train, test
