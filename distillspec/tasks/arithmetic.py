"""Built-in offline task: seeded multi-step arithmetic word problems (the default run's task).

    "Tom has 12 apples. Then Tom buys 3 bags with 4 apples each. Then Tom gives away 5 apples.
     How many apples does Tom have now?"

Each problem: a start amount (5-30) and 2-4 operations (add, bags of k, give away, double, keep a
fraction) on small integers, never going below 1. reference = the answer as a string; target_text = a
short worked solution, one `a op b = c` equation per step, ending in `#### <answer>`. Quality = accuracy
with the GSM8K extractor. Generation is deterministic: all randomness comes from a torch.Generator
seeded with `seed` (train) or `seed + 1` (eval); eval problems that also occur in train are skipped,
so the splits are disjoint, and no problem repeats within a split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distillspec.errors import ConfigError, check_range
from distillspec.tasks.base import Example, Task
from distillspec.tasks.gsm8k import MathAnswerMixin

if TYPE_CHECKING:
    import torch  # imported where used: building the task (a settings check) must not cost torch's import

NAMES = ("Tom", "Anna", "Maya", "Leo", "Sara", "Ben", "Lily", "Omar", "Nina", "Ravi")
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards")
STARTS = ("{name} has {n} {item}.", "{name} starts with {n} {item}.", "{name} owns {n} {item}.")
QUESTIONS = ("How many {item} does {name} have now?", "How many {item} does {name} have at the end?",
             "How many {item} does {name} end up with?")
OPS = ("add", "bags", "give", "double", "fraction")
FRACTIONS = {2: "half", 3: "a third", 4: "a quarter"}
_MAX_ATTEMPTS_PER_EXAMPLE = 50


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    import torch

    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _pick(gen: torch.Generator, seq):
    return seq[_randint(gen, 0, len(seq) - 1)]


def _step(gen: torch.Generator, x: int, name: str, item: str) -> tuple[str, list[str], int]:
    """One operation on the running total x: (sentence, solution equations, new total)."""
    ops = [op for op in OPS if op != "give" or x > 1]
    ops = [op for op in ops if op != "fraction" or any(x % d == 0 for d in FRACTIONS)]
    op = _pick(gen, ops)
    if op == "add":
        k = _randint(gen, 2, 15)
        return f"{name} buys {k} more {item}.", [f"{x} + {k} = {x + k}"], x + k
    if op == "bags":
        b, e = _randint(gen, 2, 5), _randint(gen, 2, 10)
        return (f"{name} buys {b} bags with {e} {item} each.",
                [f"{b} * {e} = {b * e}", f"{x} + {b * e} = {x + b * e}"], x + b * e)
    if op == "give":
        k = _randint(gen, 1, min(x - 1, 15))
        return f"{name} gives away {k} {item}.", [f"{x} - {k} = {x - k}"], x - k
    if op == "double":
        return f"{name}'s {item} double.", [f"{x} * 2 = {2 * x}"], 2 * x
    d = _pick(gen, [d for d in FRACTIONS if x % d == 0])
    return (f"{name} keeps only {FRACTIONS[d]} of the {item}.", [f"{x} / {d} = {x // d}"], x // d)


def make_problem(gen: torch.Generator) -> tuple[str, str, int]:
    """One problem from `gen`: (question, worked solution ending in '#### n', answer n)."""
    name, item = _pick(gen, NAMES), _pick(gen, ITEMS)
    x = _randint(gen, 5, 30)
    sentences = [_pick(gen, STARTS).format(name=name, n=x, item=item)]
    lines = [f"{name} starts with {x} {item}."]
    for i in range(_randint(gen, 2, 4)):
        sentence, equations, x = _step(gen, x, name, item)
        sentences.append("Then " + sentence if i else sentence)
        lines.append(", ".join(equations) + ".")
    sentences.append(_pick(gen, QUESTIONS).format(name=name, item=item))
    lines.append(f"#### {x}")
    return " ".join(sentences), "\n".join(lines), x


class ArithmeticTask(MathAnswerMixin, Task):
    """Args (besides Task's): num_train, num_eval: split sizes. seed: train uses seed, eval seed + 1."""

    name = "arithmetic"
    instruction = "{input}\nThink step by step, then end with '#### <number>'."  # short: char tokenizers
    default_max_new_tokens = 96
    default_max_prompt_tokens = 256

    def __init__(self, *, num_train: int = 2000, num_eval: int = 200, seed: int = 1234, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_range("task.num_train", num_train, lo=1)
        check_range("task.num_eval", num_eval, lo=1)
        self.num_train, self.num_eval, self.seed = int(num_train), int(num_eval), int(seed)

    def _generate(self, count: int, seed: int, exclude: set[str]) -> list[tuple[str, str, int]]:
        import torch

        gen = torch.Generator().manual_seed(seed)
        seen, out = set(exclude), []
        for _ in range(count * _MAX_ATTEMPTS_PER_EXAMPLE):
            question, solution, answer = make_problem(gen)
            if question in seen:
                continue
            seen.add(question)
            out.append((question, solution, answer))
            if len(out) == count:
                return out
        raise ConfigError(f"arithmetic: could not generate {count} distinct problems (got {len(out)}); "
                          f"lower task.num_train / task.num_eval")

    def _load(self, split: str) -> list[Example]:
        train = self._generate(self.num_train, self.seed, set())
        if split == "train":
            rows = train
        else:
            rows = self._generate(self.num_eval, self.seed + 1, {q for q, _, _ in train})
        return [Example(uid=f"{self.name}/{split}/{i}", prompt=q, reference=str(a), target_text=s,
                        meta={"split": split}) for i, (q, s, a) in enumerate(rows)]
