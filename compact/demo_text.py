"""Text written for the demo: a small, seeded generator of plain workshop stories (no download needed)."""
from __future__ import annotations

import random

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
PLACES = ["the workshop", "the garden", "the harbour", "the library", "the market", "the hill", "the station"]
THINGS = ["a lamp", "a kite", "a boat", "a clock", "a map", "a drum", "a basket", "a bell", "a ladder"]
COLOURS = ["red", "blue", "green", "yellow", "silver", "brown", "white"]
WEATHER = ["It was a bright morning.", "Rain tapped on the roof.", "The wind was cold and quick.",
           "Fog lay over the water.", "The sun was warm on the stones."]
MIDDLES = [
    "{a} found {thing} near {place} and showed it to {b}.",
    "{a} and {b} carried {thing} to {place}.",
    "{b} asked {a} why the {colour} {noun} was so small.",
    "{a} painted {thing} {colour} because {b} liked that colour best.",
    "At {place}, {a} counted the {noun}s twice and wrote the number down.",
    "{b} fixed the {noun} with string, glue and a little patience.",
    "{a} said, \"We can keep what we use and put the rest away.\"",
    "{b} laughed when the {noun} rolled under the bench.",
]
ENDINGS = [
    "In the evening they went home, tired and happy.",
    "They agreed to come back to {place} tomorrow.",
    "{a} smiled, and {b} smiled back.",
    "The {colour} {noun} stayed on the shelf, where everyone could see it.",
    "Nothing was wasted, and nothing was lost.",
]


def story(rng: random.Random) -> str:
    """One short story: weather, three to six middle sentences, an ending."""
    a, b = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    fill = {"a": a, "b": b, "thing": thing, "noun": thing.split()[1], "place": rng.choice(PLACES),
            "colour": rng.choice(COLOURS)}
    middle = [rng.choice(MIDDLES).format(**fill) for _ in range(rng.randint(3, 6))]
    return " ".join([rng.choice(WEATHER), *middle, rng.choice(ENDINGS).format(**fill)])


def stories(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [story(rng) for _ in range(count)]
