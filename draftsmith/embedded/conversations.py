"""Seeded generator of multi-turn chat conversations in a few task families, with exact reference answers.

The embedded base model is trained on these and judged against them: every assistant turn is a deterministic
function of the conversation so far, so a greedy answer is either exactly right or wrong.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from collections.abc import Callable

FAMILIES = ("arithmetic", "sorting", "spelling", "units", "facts")

# Follow-up turns are scored as their own bucket: they test the use of earlier turns, not the first skill.
FOLLOWUP = "followup"

WORDS = (
    "apple river garden planet silver window market bridge candle forest pocket rabbit winter summer "
    "castle dragon engine finger guitar hammer island jacket kitten ladder marble napkin orange pencil "
    "rocket saddle tomato violin walnut yellow zipper anchor basket cactus dinner falcon ginger helmet "
    "insect jungle kettle lemon mirror noodle oyster parrot quiver ribbon sunset tunnel umbrella velvet "
    "wizard button cookie doctor flower honey kitchen monkey number office pepper puzzle shadow spider "
    "stone table tiger water yogurt cloud dream light music paper sugar train voice beach chair"
).split()

NAMES = (
    "Arlo Bexa Corin Dalia Eskel Fenna Garit Halde Ivor Jessa Kael Lirra Mabon Nessa Orrin Pella Quill "
    "Rhosk Sabel Tovin Ulma Varek Wrenna Xander Yorick Zelda"
).split()
CITIES = "Ashford Brimvale Coldharbor Dunmere Eastmarch Fallowby Greywick Highmoor Ironbridge Juniper".split()
COLORS = "red blue green yellow purple orange teal black white silver".split()

# (from unit, to unit, factor): powers of ten, so a small model can generalise by appending zeros.
UNIT_CONVERSIONS = (
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("liters", "milliliters", 1000),
    ("cm", "mm", 10),
)

# Families whose prompt space is finite: spelling draws from a fixed word list, so its held-out prompts are
# the same words in new conversations rather than unseen words (an unseen word's letters cannot be inferred).
_FINITE_PROMPT_FAMILIES = frozenset({"spelling"})


@dataclass
class Turn:
    user: str
    assistant: str
    kind: str  # a family name for the first turn, FOLLOWUP for later ones


@dataclass
class Conversation:
    family: str
    turns: list[Turn]
    system: str | None = None
    conversation_id: str = field(default="")

    def messages(self, with_answers: bool = True) -> list[dict[str, str]]:
        """The conversation in OpenAI chat format; without answers, only the system and user turns remain."""
        msgs: list[dict[str, str]] = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        for turn in self.turns:
            msgs.append({"role": "user", "content": turn.user})
            if with_answers:
                msgs.append({"role": "assistant", "content": turn.assistant})
        return msgs

    @classmethod
    def from_record(cls, record: dict) -> Conversation:
        """Inverse of `to_record`."""
        msgs = record["messages"]
        system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
        rest = msgs[1:] if system is not None else msgs
        turns = [Turn(rest[i]["content"], rest[i + 1]["content"], kind)
                 for i, kind in zip(range(0, len(rest), 2), record["kinds"], strict=True)]
        return cls(record["family"], turns, system=system, conversation_id=record["conversation_id"])

    def to_record(self) -> dict:
        return {
            "conversation_id": self.conversation_id,
            "family": self.family,
            "kinds": [t.kind for t in self.turns],
            "messages": self.messages(),
        }


def _addition_steps(a: int, b: int) -> str:
    """Worked column addition of a two-digit number and a number below 100."""
    a_ones, a_tens = a % 10, a // 10
    b_ones, b_tens = b % 10, b // 10
    ones = a_ones + b_ones
    carry = ones // 10
    if carry:
        first = f"Add the ones: {a_ones} + {b_ones} = {ones}, write {ones % 10} carry 1."
        tens_terms = f"{a_tens} + {b_tens} + 1"
    else:
        first = f"Add the ones: {a_ones} + {b_ones} = {ones}, write {ones}."
        tens_terms = f"{a_tens} + {b_tens}"
    tens = a_tens + b_tens + carry
    return f"{first} Add the tens: {tens_terms} = {tens}. So {a} + {b} = {a + b}."


def _sorted_answer(xs: list[int]) -> str:
    return f"Sorted: {_fmt_list(sorted(xs))}."


def _spelled_answer(word: str) -> str:
    return f"{word} is spelled {'-'.join(word)}."


def _converted_answer(n: int, src: str, dst: str, factor: int) -> str:
    return f"1 {src} is {factor} {dst}, so {n} {src} is {n} x {factor} = {n * factor} {dst}."


def _arithmetic(rng: random.Random) -> Conversation:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    turns = [Turn(f"What is {a} + {b}?", _addition_steps(a, b), "arithmetic")]
    if rng.random() < 0.5:
        total = a + b
        if total < 100:
            c = rng.randint(1, 9)
            turns.append(Turn(f"Now add {c} to that.", _addition_steps(total, c), FOLLOWUP))
        else:
            turns.append(Turn("Is that more than 100?", f"Yes, {total} is more than 100.", FOLLOWUP))
    return Conversation("arithmetic", turns)


def _fmt_list(xs: list[int]) -> str:
    return ", ".join(str(x) for x in xs)


def _maybe_one_of(rng: random.Random, *followups: Turn, share_each: float = 0.3) -> list[Turn]:
    """One of `followups`, each with probability `share_each`, or none."""
    index = int(rng.random() / share_each)
    return [followups[index]] if index < len(followups) else []


def _sorting(rng: random.Random) -> Conversation:
    xs = rng.sample(range(1, 100), rng.randint(3, 6))
    ordered = sorted(xs)
    turns = [Turn(f"Sort these numbers in ascending order: {_fmt_list(xs)}.", _sorted_answer(xs), "sorting")]
    turns += _maybe_one_of(rng, Turn("Now reverse that list.", f"Reversed: {_fmt_list(ordered[::-1])}.", FOLLOWUP),
                           Turn("Which one is the largest?", f"The largest is {ordered[-1]}.", FOLLOWUP))
    return Conversation("sorting", turns)


def _spelling(rng: random.Random) -> Conversation:
    word = rng.choice(WORDS)
    turns = [Turn(f"Spell the word \"{word}\".", _spelled_answer(word), "spelling")]
    turns += _maybe_one_of(rng, Turn("How many letters is that?", f"{word} has {len(word)} letters.", FOLLOWUP),
                           Turn("Now spell it backwards.", f"Backwards: {'-'.join(word[::-1])}.", FOLLOWUP))
    return Conversation("spelling", turns)


def _units(rng: random.Random) -> Conversation:
    index = rng.randrange(len(UNIT_CONVERSIONS))
    src, dst, factor = UNIT_CONVERSIONS[index]
    n = rng.randint(1, 99)
    value = n * factor
    turns = [Turn(f"Convert {n} {src} to {dst}.", _converted_answer(n, src, dst, factor), "units")]
    # A follow-up that continues the chain km -> m -> cm needs the previous answer's number.
    if (src, dst) == ("km", "m") and rng.random() < 0.5:
        turns.append(Turn("And how many cm is that?",
                          f"1 m is 100 cm, so {value} m is {value} x 100 = {value * 100} cm.", FOLLOWUP))
    return Conversation("units", turns)


def taught_turn(prompt: str) -> Turn | None:
    """The turn the generator writes for a first question in one of its computed phrasings (a sum of two two-digit
    numbers, a sort of 3-6 distinct numbers below 100, the spelling of one of its words, a unit conversion of
    1-99): the reference answer and the family (`kind`), None for any other prompt. The base learns some families
    exactly and others hardly (its build report's exact match per family)."""
    text = prompt.strip()
    if match := re.fullmatch(r"What is ([1-9]\d) \+ ([1-9]\d)\?", text):
        return Turn(text, _addition_steps(int(match[1]), int(match[2])), "arithmetic")
    if match := re.fullmatch(r"Sort these numbers in ascending order: ([1-9]\d?(?:, [1-9]\d?){2,5})\.", text):
        xs = [int(x) for x in match[1].split(", ")]
        return Turn(text, _sorted_answer(xs), "sorting") if len(set(xs)) == len(xs) else None
    if (match := re.fullmatch(r'Spell the word "([a-z]+)"\.', text)) and match[1] in WORDS:
        return Turn(text, _spelled_answer(match[1]), "spelling")
    if match := re.fullmatch(r"Convert ([1-9]\d?) (\w+) to (\w+)\.", text):
        n, src, dst = int(match[1]), match[2], match[3]
        factor = next((f for s, d, f in UNIT_CONVERSIONS if (s, d) == (src, dst)), None)
        return None if factor is None else Turn(text, _converted_answer(n, src, dst, factor), "units")
    return None


def _facts(rng: random.Random) -> Conversation:
    people = rng.sample(NAMES, rng.randint(3, 4))
    rows = {p: (rng.choice(CITIES), rng.choice(COLORS), rng.randint(18, 80)) for p in people}
    table = "\n".join(f"{p} | {c} | {col} | {age}" for p, (c, col, age) in rows.items())
    system = f"Answer from this table.\nname | city | color | age\n{table}"
    attribute = rng.choice(("city", "color", "age"))

    def ask(person: str) -> tuple[str, str]:
        city, color, age = rows[person]
        if attribute == "city":
            return f"Where does {person} live?", f"{person} lives in {city}."
        if attribute == "color":
            return f"What is {person}'s favorite color?", f"{person}'s favorite color is {color}."
        return f"How old is {person}?", f"{person} is {age} years old."

    first, *others = rng.sample(people, len(people))
    q, a = ask(first)
    turns = [Turn(q, a, "facts")]
    if rng.random() < 0.5:
        turns.append(Turn(f"And {others[0]}?", ask(others[0])[1], FOLLOWUP))
    return Conversation("facts", turns, system=system)


_GENERATORS: dict[str, Callable[[random.Random], Conversation]] = {
    "arithmetic": _arithmetic,
    "sorting": _sorting,
    "spelling": _spelling,
    "units": _units,
    "facts": _facts,
}


def _with_recall(conv: Conversation, rng: random.Random, share: float) -> Conversation:
    """Sometimes append a turn that asks the model to repeat the first question verbatim."""
    if rng.random() < share:
        conv.turns.append(Turn("What was my first question?", f"Your first question was: {conv.turns[0].user}",
                               FOLLOWUP))
    return conv


def conversation_key(conv: Conversation) -> str:
    """Content hash of what the user asks (system + user turns): the identity used to hold prompts out."""
    text = "\x1f".join(m["content"] for m in conv.messages(with_answers=False))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def generate_conversations(
    count: int,
    seed: int,
    families: tuple[str, ...] = FAMILIES,
    recall_share: float = 0.1,
    exclude_keys: frozenset[str] = frozenset(),
) -> list[Conversation]:
    """`count` seeded conversations, families in round-robin order, skipping any whose key is excluded."""
    unknown = sorted(set(families) - set(_GENERATORS))
    if unknown:
        raise ValueError(f"unknown task families {unknown}; valid ones are {sorted(_GENERATORS)}")
    rng = random.Random(seed)
    out: list[Conversation] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(
                f"could not generate {count} conversations outside the {len(exclude_keys)} excluded ones; "
                "lower the count or the held-out share"
            )
        family = families[len(out) % len(families)]
        conv = _with_recall(_GENERATORS[family](rng), rng, recall_share)
        key = conversation_key(conv)
        if key in exclude_keys and family not in _FINITE_PROMPT_FAMILIES:
            continue
        conv.conversation_id = f"{family}-{key}"
        out.append(conv)
    return out


def train_and_heldout(
    num_train: int, num_heldout: int, seed: int, families: tuple[str, ...] = FAMILIES, recall_share: float = 0.1
) -> tuple[list[Conversation], list[Conversation]]:
    """Disjoint training and held-out sets: held-out prompts never appear (by content) in the training set."""
    heldout = generate_conversations(num_heldout, seed + 1_000_003, families, recall_share)
    keys = frozenset(conversation_key(c) for c in heldout)
    train = generate_conversations(num_train, seed, families, recall_share, exclude_keys=keys)
    return train, heldout
