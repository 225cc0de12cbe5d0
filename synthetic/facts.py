"""A generated fact-lookup task for retrieval-augmented models: the answer is only in one passage.

Made-up entities ("Bamcis") each have one fact, stated in a passage of its own: "The seal of Bamcis is
vorlan." *Distractor* passages name the entity and the fact but not its value ("Nobody knows the seal
of Bamcis, say travellers from Tovel."), several per entity, so a retriever matching words ranks them
beside or above the gold passage: only the reader can tell which passage holds the answer. (Measured: the
generic bi-encoder's top 4 are mostly *other* entities' fact passages, 91 %, which mislead a reader that
copies a value without checking the entity; see bench/RESULTS.md.) A query asks the fact:
``What is the seal of Bamcis?`` -> ``vorlan``.

Values are drawn uniformly from `values` made-up words, so a model that does not read the gold
passage answers at chance (``1 / values`` exact match); with the gold passage in its context the answer
is a copy. Facts of *held-out* entities are never asked in training, so test accuracy cannot come from
memorising answers: it needs the retriever to find the passage and the reader to copy from it.

Why words and not numbers ("the code of Zarnet is 4817"): the project's tokenizer splits digits, so a
number is a multi-token copy, which a reader trained from scratch learns only once it has formed an
induction circuit (over a thousand steps on a 2-core CPU with the gold passage always in context); a
value word is one token (after a space, as in its passage), so the experiment measures retrieval.

Everything is a pure function of the `FactsTask` fields (seeded `random.Random`), so the task is a
generator shipped in the repository, not data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hybrid_pretrain.base.errors import ConfigError
from hybrid_pretrain.retrieval.passages import passage_id

SOURCE = "facts"  # the passage store's source name; with the document index it fixes each passage id
_ONSETS = "b c d f g h j k l m n p r s t v z br dr gr kr tr th sh".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "n", "r", "l", "th", "m", "s", "x"]


@dataclass
class FactsTask:
    """Shape of the generated task; every field is part of its identity (same fields, same task)."""

    entities: int = 1000
    attributes: list[str] = field(default_factory=lambda: ["seal", "crest", "motto"])  # each entity has one
    values: int = 100  # made-up value words; exact match by chance is 1 / values
    distractors: int = 3  # distractor passages per entity: its name and fact word, no value
    heldout_fraction: float = 0.2  # entities whose facts are asked only at test time
    seed: int = 0

    def validate(self) -> None:
        if self.entities < 10:
            raise ConfigError(f"task.entities must be at least 10, got {self.entities}")
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise ConfigError(f"task.attributes must be distinct non-empty words, got {self.attributes}")
        if not all(a.isalpha() and a.islower() for a in self.attributes):
            raise ConfigError(f"task.attributes must be lower-case words, got {self.attributes}")
        if self.values < 2:
            raise ConfigError(f"task.values must be at least 2, got {self.values}")
        if self.distractors < 0:
            raise ConfigError(f"task.distractors must be >= 0, got {self.distractors}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"task.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")

    @property
    def chance(self) -> float:
        """Exact-match accuracy of a uniform guess."""
        return 1.0 / self.values


@dataclass(frozen=True)
class Query:
    text: str  # "What is the seal of Bamcis?"
    answer: str  # "vorlan"
    entity: int
    gold_id: int  # passage id (retrieval.passages.passage_id) of the passage that states the answer


@dataclass
class FactsData:
    """The passages, in store order, and the queries split by entity."""

    documents: list[tuple[str, int, str]]  # (source, document index, text): what retrieval.passages.write_store takes
    train: list[Query]
    test: list[Query]
    names: list[str]  # entity names, by entity index

    def texts(self) -> list[str]:
        """Every passage and query text: what a tokenizer for the task is trained on."""
        return [d[2] for d in self.documents] + [q.text for q in self.train + self.test]


def made_up_words(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    """`n` distinct two-syllable made-up words ("bamcis"), none in `exclude`, sorted."""
    words: set[str] = set()
    while len(words) < n:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2))
        if word not in exclude:
            words.add(word)
    return sorted(words)


def generate(task: FactsTask) -> FactsData:
    """The passages and queries of `task` (deterministic in its fields)."""
    task.validate()
    rng = random.Random(task.seed)
    names = [w.capitalize() for w in made_up_words(task.entities, rng)]
    rng.shuffle(names)
    values = made_up_words(task.values, rng, exclude={n.lower() for n in names})
    facts = [(rng.choice(task.attributes), rng.choice(values)) for _ in names]  # (attribute, value) per entity
    texts = [f"The {a} of {name} is {v}." for name, (a, v) in zip(names, facts)]  # entity e's passage is texts[e]
    for e, name in enumerate(names):
        for _ in range(task.distractors):
            elsewhere = names[rng.randrange(len(names))]
            texts.append(f"Nobody knows the {facts[e][0]} of {name}, say travellers from {elsewhere}.")
    order = list(range(len(texts)))
    rng.shuffle(order)  # gold and distractor passages interleave in the store
    doc_of_text = {t: d for d, t in enumerate(order)}
    documents = [(SOURCE, d, texts[t]) for d, t in enumerate(order)]
    queries = [Query(f"What is the {a} of {name}?", v, e, passage_id(SOURCE, doc_of_text[e], 0))
               for e, (name, (a, v)) in enumerate(zip(names, facts))]
    heldout = max(1, round(task.heldout_fraction * len(names)))
    return FactsData(documents, queries[heldout:], queries[:heldout], names)
