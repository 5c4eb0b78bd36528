"""Built-in reasoning tasks for the CPU demo: small arithmetic word problems in Arabic and English.

The chain-of-thought demo trains a tiny teacher on these problems, lets it write traces and distils a
student from them, then measures accuracy on a held-out split. So the task is made to be learnable by
a model with a hidden size of 128: numbers are small, there are five templates per operation, every
response has the same shape, and prompt plus response stays under about 60 words.

One underlying *instance* is an operation, its operands, a template index and a name. Each instance
is rendered in every language (the templates and names are parallel), so problem ``k`` reads the same
in Arabic and English and bilingual consistency can be measured. Ids share the instance index:
``arith-test-00012-ar`` and ``arith-test-00012-en``.

Splits are held out by construction: a stable hash of the instance (not of the seed) puts it in
``train`` (80 %), ``val`` (10 %) or ``test`` (10 %), so no seed or ``max_operand`` can make two
splits share an instance. The arithmetic facts themselves (``3 + 5``) do occur in every split, with
different templates and names: the demo measures whether the student learnt the task, not whether it
can add numbers it never saw.

Text conventions (the tokenizer and the answer checks rely on them):

* Numbers are written with ASCII digits in both languages; the operators are ASCII ``+``, ``-`` and
  ``*`` (one byte-level token each, never a letter, unlike ``x``; ``×`` is two bytes).
* The reasoning restates the facts, names the operation and ends with the equation::

      Sara has 3. She buys 5 more. We add: 3 + 5 = 8.
      مع سارة 3، ثم اشترت 5. نجمع: 3 + 5 = 8.

  ``two_step`` (``a + b - c``) ends with two equations, the last one giving the answer.
* The answer sentence is ``The answer is 8.`` / ``الجواب هو 8.``.
* Arabic is unvocalized Modern Standard Arabic. To stay grammatical for every number, a number is
  never followed directly by the noun it counts (which would need dual, gender and singular-after-10
  agreement); the texts say ``3 من التفاحات`` ("3 of the apples") or leave the noun out, and ask
  with ``كم`` followed by the singular (``كم تفاحة``). Verbs and pronouns agree with the name's gender.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from moe_adapt.distill.format import ResponseFormat
from moe_adapt.errors import invalid
from moe_adapt.fs import atomic_open

LANGS = ("ar", "en")
"""Languages every template is written in."""

OPS = ("add", "sub", "mul", "two_step")
"""Operations: ``a + b``, ``a - b`` (``b <= a``), ``a * b`` (small), ``a + b - c`` (``c <= a + b``)."""
# Every operand is at most ``max_operand``; only ``two_step``'s intermediate ``a + b`` can exceed it.

SPLIT_PERCENT = {"train": 80, "val": 10, "test": 10}
"""Share (in percent) of all instances that the instance hash puts in each split."""

MAX_OPERAND_LIMIT = 20
"""Largest ``max_operand`` allowed: numbers stay small (``two_step`` enumerates ~``max_operand**3`` cases)."""

MUL_MAX = 5
"""Multiplication operands run from 2 to ``min(max_operand, MUL_MAX)``: a small times table."""

OPERATOR = {"add": "+", "sub": "-", "mul": "*"}
"""The ASCII operator written in the equations, the same in every language."""

FINAL = {"ar": "الجواب هو {r}.", "en": "The answer is {r}."}
"""The answer sentence per language; ``{r}`` is the result in ASCII digits."""

CUE = {
    "ar": {"add": "نجمع", "sub": "نطرح", "mul": "نضرب", "first": "أولا نجمع", "then": "ثم نطرح"},
    "en": {
        "add": "We add",
        "sub": "We subtract",
        "mul": "We multiply",
        "first": "First we add",
        "then": "Then we subtract",
    },
}
"""The words that name the operation before each equation (``first``, ``then``: the steps of ``two_step``)."""

NAMES: tuple[tuple[str, str, str], ...] = (
    ("سارة", "Sara", "f"),
    ("أحمد", "Ahmed", "m"),
    ("ليلى", "Layla", "f"),
    ("عمر", "Omar", "m"),
    ("مريم", "Maryam", "f"),
    ("يوسف", "Yusuf", "m"),
    ("فاطمة", "Fatima", "f"),
    ("خالد", "Khalid", "m"),
)
"""Parallel names: (Arabic, English, gender ``m``/``f``). The gender picks verb and pronoun forms."""


@dataclass(frozen=True)
class _Template:
    """One word problem in both languages.

    Placeholders: ``{name}``, ``{a}``, ``{b}``, ``{c}``. ``[masc|fem]`` picks the form for the name's
    gender; ``[a:one|many]`` (also ``b:``/``c:``) picks the English singular when that operand is 1.
    """

    prompt: dict[str, str]
    """The question, per language."""
    facts: dict[str, str]
    """The short restatement that opens the reasoning, per language."""


def _t(ar_prompt: str, ar_facts: str, en_prompt: str, en_facts: str) -> _Template:
    return _Template(prompt={"ar": ar_prompt, "en": en_prompt}, facts={"ar": ar_facts, "en": en_facts})


TEMPLATES: dict[str, tuple[_Template, ...]] = {
    "add": (
        _t(
            "مع {name} {a} من التفاحات، ثم [اشترى|اشترت] {b} من التفاحات. كم تفاحة مع {name} الآن؟",
            "مع {name} {a}، ثم [اشترى|اشترت] {b}.",
            "{name} has {a} [a:apple|apples]. [He|She] buys {b} more. "
            "How many apples does [he|she] have now?",
            "{name} has {a}. [He|She] buys {b} more.",
        ),
        _t(
            "لدى {name} {a} من الكتب، ثم [أعطاه|أعطاها] صديق {b} من الكتب. كم كتابا لدى {name} الآن؟",
            "لدى {name} {a}، ثم [حصل|حصلت] على {b}.",
            "{name} has {a} [a:book|books]. A friend gives [him|her] {b} more. "
            "How many books does [he|she] have now?",
            "{name} has {a}. [He|She] gets {b} more.",
        ),
        _t(
            "في حقيبة {name} {a} من الأقلام، ثم [وضع|وضعت] فيها {b} من الأقلام. كم قلما في الحقيبة الآن؟",
            "في الحقيبة {a}، ثم [وضع|وضعت] {name} فيها {b}.",
            "{name} has {a} [a:pen|pens] in a bag. [He|She] puts in {b} more. "
            "How many pens are in the bag now?",
            "The bag has {a}. {name} puts in {b} more.",
        ),
        _t(
            "[رأى|رأت] {name} {a} من العصافير على شجرة، ثم طار إليها {b} من العصافير. "
            "كم عصفورا على الشجرة الآن؟",
            "على الشجرة {a}، ثم طار إليها {b}.",
            "{name} sees {a} [a:bird|birds] on a tree. Then {b} more [b:bird lands|birds land] there. "
            "How many birds are on the tree now?",
            "The tree has {a}. Then {b} more [b:comes|come].",
        ),
        _t(
            "[قطف|قطفت] {name} في الصباح {a} من التمرات، وفي المساء {b} من التمرات. "
            "كم تمرة [قطف|قطفت] {name} في اليوم كله؟",
            "[قطف|قطفت] {name} {a}، ثم {b}.",
            "{name} picks {a} [a:date|dates] in the morning and {b} [b:date|dates] in the evening. "
            "How many dates does [he|she] pick in all?",
            "[He|She] picks {a}, then {b}.",
        ),
    ),
    "sub": (
        _t(
            "مع {name} {a} من التفاحات، ثم [أكل|أكلت] {b} منها. كم تفاحة بقيت مع {name}؟",
            "مع {name} {a}، ثم [أكل|أكلت] {b}.",
            "{name} has {a} [a:apple|apples]. [He|She] eats {b} of them. How many apples are left?",
            "{name} has {a}. [He|She] eats {b}.",
        ),
        _t(
            "لدى {name} {a} من الكتب، ثم [أعطى|أعطت] صديقا {b} منها. كم كتابا بقي لدى {name}؟",
            "لدى {name} {a}، ثم [أعطى|أعطت] {b}.",
            "{name} has {a} [a:book|books]. [He|She] gives {b} to a friend. "
            "How many books does [he|she] have left?",
            "{name} has {a}. [He|She] gives away {b}.",
        ),
        _t(
            "مع {name} {a} من الأقلام، ثم [أضاع|أضاعت] {b} منها في المدرسة. كم قلما مع {name} الآن؟",
            "مع {name} {a}، ثم [أضاع|أضاعت] {b}.",
            "{name} has {a} [a:pen|pens]. [He|She] loses {b} at school. "
            "How many pens does [he|she] have now?",
            "{name} has {a}. [He|She] loses {b}.",
        ),
        _t(
            "[رأى|رأت] {name} {a} من العصافير على شجرة، ثم طار منها {b}. كم عصفورا بقي على الشجرة؟",
            "على الشجرة {a}، ثم طار منها {b}.",
            "{name} sees {a} [a:bird|birds] on a tree. Then {b} [b:flies|fly] away. "
            "How many birds are still on the tree?",
            "The tree has {a}. Then {b} [b:flies|fly] away.",
        ),
        _t(
            "مع {name} {a} من القطع النقدية، ثم [أنفق|أنفقت] {b} منها على الخبز. "
            "كم قطعة نقدية بقيت مع {name}؟",
            "مع {name} {a}، ثم [أنفق|أنفقت] {b}.",
            "{name} has {a} [a:coin|coins]. [He|She] spends {b} on bread. "
            "How many coins does [he|she] have left?",
            "{name} has {a}. [He|She] spends {b}.",
        ),
    ),
    "mul": (
        _t(
            "مع {name} {a} من الصناديق، وفي كل صندوق {b} من الأقلام. كم قلما مع {name} في المجموع؟",
            "عدد الصناديق {a}، وفي كل صندوق {b}.",
            "{name} has {a} [a:box|boxes]. Each box holds {b} [b:pen|pens]. "
            "How many pens does [he|she] have in all?",
            "There are {a} [a:box|boxes] with {b} in each.",
        ),
        _t(
            "[اشترى|اشترت] {name} {a} من الأكياس، وفي كل كيس {b} من التفاحات. كم تفاحة [اشترى|اشترت] {name}؟",
            "عدد الأكياس {a}، وفي كل كيس {b}.",
            "{name} buys {a} [a:bag|bags] of apples. Each bag has {b} [b:apple|apples]. "
            "How many apples does [he|she] buy?",
            "There are {a} [a:bag|bags] with {b} in each.",
        ),
        _t(
            "لدى {name} {a} من الرفوف، وعلى كل رف {b} من الكتب. كم كتابا على الرفوف؟",
            "عدد الرفوف {a}، وعلى كل رف {b}.",
            "{name} has {a} [a:shelf|shelves]. Each shelf holds {b} [b:book|books]. "
            "How many books are on the shelves?",
            "There are {a} [a:shelf|shelves] with {b} on each.",
        ),
        _t(
            "في حديقة {name} {a} من الصفوف، وفي كل صف {b} من الورود. كم وردة في الحديقة؟",
            "عدد الصفوف {a}، وفي كل صف {b}.",
            "{name}'s garden has {a} [a:row|rows] of roses with {b} [b:rose|roses] in each row. "
            "How many roses are in the garden?",
            "There are {a} [a:row|rows] with {b} in each.",
        ),
        _t(
            "لدى {name} {a} من الأطباق، و[وضع|وضعت] على كل طبق {b} من التمرات. كم تمرة على الأطباق؟",
            "عدد الأطباق {a}، وعلى كل طبق {b}.",
            "{name} has {a} [a:plate|plates]. [He|She] puts {b} [b:date|dates] on each plate. "
            "How many dates are on the plates?",
            "There are {a} [a:plate|plates] with {b} on each.",
        ),
    ),
    "two_step": (
        _t(
            "مع {name} {a} من التفاحات، ثم [اشترى|اشترت] {b} من التفاحات و[أكل|أكلت] {c} منها. "
            "كم تفاحة مع {name} الآن؟",
            "مع {name} {a}، ثم [اشترى|اشترت] {b} و[أكل|أكلت] {c}.",
            "{name} has {a} [a:apple|apples]. [He|She] buys {b} more and eats {c}. "
            "How many apples does [he|she] have now?",
            "{name} has {a}. [He|She] buys {b} and eats {c}.",
        ),
        _t(
            "لدى {name} {a} من الكتب، ثم [أعطاه|أعطاها] صديق {b} من الكتب، ثم [أعطى|أعطت] {c} منها "
            "[لأخيه|لأخيها]. كم كتابا لدى {name} الآن؟",
            "لدى {name} {a}، ثم [حصل|حصلت] على {b} و[أعطى|أعطت] {c}.",
            "{name} has {a} [a:book|books]. A friend gives [him|her] {b} more, then [he|she] gives {c} "
            "to [his|her] brother. How many books does [he|she] have now?",
            "{name} has {a}. [He|She] gets {b} and gives away {c}.",
        ),
        _t(
            "[أحصى|أحصت] {name} {a} من الركاب في الحافلة. في المحطة صعد {b} ونزل {c}. "
            "كم راكبا في الحافلة الآن؟",
            "في الحافلة {a}، ثم صعد {b} ونزل {c}.",
            "{name} counts {a} [a:person|people] on a bus. At a stop {b} [b:gets|get] on and {c} "
            "[c:gets|get] off. How many people are on the bus now?",
            "The bus has {a}. Then {b} [b:gets|get] on and {c} [c:gets|get] off.",
        ),
        _t(
            "[رأى|رأت] {name} {a} من العصافير على شجرة، ثم طار إليها {b} وطار منها {c}. "
            "كم عصفورا على الشجرة الآن؟",
            "على الشجرة {a}، ثم طار إليها {b} وطار منها {c}.",
            "{name} sees {a} [a:bird|birds] on a tree. Then {b} more [b:comes|come] and {c} [c:flies|fly] "
            "away. How many birds are on the tree now?",
            "The tree has {a}. Then {b} [b:comes|come] and {c} [c:flies|fly] away.",
        ),
        _t(
            "مع {name} {a} من القطع النقدية، ثم [أعطته أمه|أعطتها أمها] {b} من القطع النقدية، "
            "و[أنفق|أنفقت] {c} منها. كم قطعة نقدية مع {name} الآن؟",
            "مع {name} {a}، ثم [أخذ|أخذت] {b} و[أنفق|أنفقت] {c}.",
            "{name} has {a} [a:coin|coins]. [His|Her] mother gives [him|her] {b} more, "
            "and [he|she] spends {c}. How many coins does [he|she] have now?",
            "{name} has {a}. [He|She] gets {b} and spends {c}.",
        ),
    ),
}
"""Five parallel templates per operation; template ``i`` says the same thing in both languages."""

_CHOICE = re.compile(r"\[(?:(?P<var>[abc]):)?(?P<first>[^|\]]*)\|(?P<second>[^\]]*)\]")


@dataclass(frozen=True)
class Problem:
    """One word problem in one language, with its worked solution."""

    id: str
    """Unique per language, and shared with the parallel problem up to the suffix: ``arith-test-00012-ar``."""
    lang: str
    """``ar`` or ``en``."""
    prompt: str
    """The question."""
    answer: str
    """The canonical answer in ASCII digits, e.g. ``8``."""
    reasoning: str
    """The worked steps, ending with the equation: ``Sara has 3. She buys 5 more. We add: 3 + 5 = 8.``"""
    final: str
    """The answer sentence: ``The answer is 8.`` / ``الجواب هو 8.``."""

    def response(self, fmt: ResponseFormat | None = None) -> str:
        """The reference response: reasoning between the delimiters of ``fmt``, then the answer sentence."""
        return (fmt or ResponseFormat()).render(self.reasoning, self.final)

    def to_record(self) -> dict[str, str]:
        """The JSON-able record written by :func:`write_problem_set`."""
        return {
            "id": self.id,
            "lang": self.lang,
            "prompt": self.prompt,
            "answer": self.answer,
            "answer_type": "numeric",
            "reference_response": self.response(),
        }


_Instance = tuple[str, tuple[int, ...], int, int]
"""(operation, operands, template index, name index): what a problem says, in any language."""


def _fill(text: str, name: str, gender: str, operands: tuple[int, ...]) -> str:
    values = dict(zip("abc", operands, strict=False))

    def choose(m: re.Match[str]) -> str:
        var = m.group("var")
        pick_first = values[var] == 1 if var else gender == "m"
        return m.group("first") if pick_first else m.group("second")

    return _CHOICE.sub(choose, text).format(name=name, **values)


def _steps(op: str, operands: tuple[int, ...], lang: str) -> tuple[str, int]:
    """The equations that close the reasoning, and the result."""
    cue = CUE[lang]
    if op == "two_step":
        a, b, c = operands
        text = f"{cue['first']}: {a} + {b} = {a + b}. {cue['then']}: {a + b} - {c} = {a + b - c}."
        return text, a + b - c
    a, b = operands
    result = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    return f"{cue[op]}: {a} {OPERATOR[op]} {b} = {result}.", result


def _render(instance: _Instance, lang: str, problem_id: str) -> Problem:
    op, operands, template_idx, name_idx = instance
    template = TEMPLATES[op][template_idx]
    ar_name, en_name, gender = NAMES[name_idx]
    name = ar_name if lang == "ar" else en_name
    equations, result = _steps(op, operands, lang)
    facts = _fill(template.facts[lang], name, gender, operands)
    return Problem(
        id=problem_id,
        lang=lang,
        prompt=_fill(template.prompt[lang], name, gender, operands),
        answer=str(result),
        reasoning=f"{facts} {equations}",
        final=FINAL[lang].format(r=result),
    )


def _operands(op: str, max_operand: int) -> list[tuple[int, ...]]:
    span = range(1, max_operand + 1)
    if op == "add":
        return [(a, b) for a in span for b in span]
    if op == "sub":
        return [(a, b) for a in span for b in range(1, a + 1)]
    if op == "mul":
        small = range(2, min(max_operand, MUL_MAX) + 1)
        return [(a, b) for a in small for b in small]
    return [(a, b, c) for a in span for b in span for c in range(1, min(a + b, max_operand) + 1)]


def _split_of(instance: _Instance) -> str:
    """The split an instance belongs to: a stable hash of the instance alone (no seed, no settings)."""
    op, operands, template_idx, name_idx = instance
    key = f"arith|{op}|{','.join(map(str, operands))}|{template_idx}|{name_idx}".encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % 100
    for split, percent in SPLIT_PERCENT.items():
        if bucket < percent:
            return split
        bucket -= percent
    raise AssertionError("SPLIT_PERCENT must add up to 100")


@lru_cache(maxsize=64)
def _pool(op: str, max_operand: int, split: str) -> tuple[_Instance, ...]:
    """Every instance of ``op`` in ``split``, in a fixed order."""
    instances = (
        (op, operands, t, n)
        for operands in _operands(op, max_operand)
        for t in range(len(TEMPLATES[op]))
        for n in range(len(NAMES))
    )
    return tuple(inst for inst in instances if _split_of(inst) == split)


def _check_choices(key: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        invalid(key, values, f"must be a non-empty list drawn from {list(allowed)}")
    bad = [v for v in values if v not in allowed]
    if bad:
        invalid(key, list(values), f"unknown {bad}; allowed: {list(allowed)}")
    if len(set(values)) != len(values):
        invalid(key, list(values), "must not repeat an entry")
    return tuple(values)


def _check_space(split: str, max_operand: int, ops: Sequence[str]) -> tuple[str, ...]:
    """Validate the arguments that fix the instance space; return the operations as a tuple."""
    if not isinstance(split, str) or split not in SPLIT_PERCENT:
        invalid("distill.task.split", split, f"must be one of {list(SPLIT_PERCENT)}")
    if (
        isinstance(max_operand, bool)
        or not isinstance(max_operand, int)
        or not 2 <= max_operand <= MAX_OPERAND_LIMIT
    ):
        invalid("distill.task.max_operand", max_operand, f"must be an integer from 2 to {MAX_OPERAND_LIMIT}")
    return _check_choices("distill.task.ops", ops, OPS)


def _most(operations: tuple[str, ...], pools: Sequence[tuple[_Instance, ...]]) -> int:
    # Op i gets the problems j < n with j % len(ops) == i, i.e. ceil((n - i) / len(ops)) of them;
    # that fits its pool p_i exactly when n <= len(ops) * p_i + i.
    return min(len(operations) * len(pool) + i for i, pool in enumerate(pools))


def max_problems(split: str = "train", *, max_operand: int = 10, ops: Sequence[str] = ("add", "sub")) -> int:
    """The largest ``n_per_lang`` that :func:`make_problems` accepts for these settings."""
    operations = _check_space(split, max_operand, ops)
    return _most(operations, [_pool(op, max_operand, split) for op in operations])


def make_problems(
    n_per_lang: int,
    langs: Sequence[str] = ("ar", "en"),
    *,
    split: str = "train",
    seed: int = 0,
    max_operand: int = 10,
    ops: Sequence[str] = ("add", "sub"),
) -> list[Problem]:
    """``n_per_lang`` arithmetic word problems per language from ``split``, deterministic in seed and split.

    The same instances are rendered in every language of ``langs`` (problem ``k`` has the id
    ``arith-{split}-{k:05d}-{lang}`` in each), and which instances are drawn does not depend on
    ``langs``. The operations in ``ops`` are balanced (round robin, then shuffled). Operands run from 1
    to ``max_operand`` (multiplication: 2 to ``min(max_operand, 5)``). The list holds all problems of
    the first language, then all of the next, each in instance order.

    Raises :class:`~moe_adapt.errors.MoEAdaptConfigError` for a bad argument, or when the split holds
    fewer instances than asked for (the message gives the largest ``n_per_lang`` possible, which
    :func:`max_problems` also returns).
    """
    operations = _check_space(split, max_operand, ops)
    languages = _check_choices("distill.task.langs", langs, LANGS)
    if isinstance(seed, bool) or not isinstance(seed, int):
        invalid("distill.task.seed", seed, "must be an integer")
    if isinstance(n_per_lang, bool) or not isinstance(n_per_lang, int) or n_per_lang < 1:
        invalid("distill.task.n_per_lang", n_per_lang, "must be a positive integer")

    pools = [_pool(op, max_operand, split) for op in operations]
    most = _most(operations, pools)
    if n_per_lang > most:
        sizes = ", ".join(f"{op}: {len(pool)}" for op, pool in zip(operations, pools, strict=True))
        invalid(
            "distill.task.n_per_lang",
            n_per_lang,
            f"split {split!r} with ops={list(operations)} and max_operand={max_operand} allows at most "
            f"{most} problems per language, the operations being balanced (instances per op: {sizes})",
        )
    drawn: list[_Instance] = []
    for i, (op, pool) in enumerate(zip(operations, pools, strict=True)):
        quota = len(range(i, n_per_lang, len(operations)))
        drawn += random.Random(f"arith|{split}|{seed}|{op}").sample(pool, quota)
    random.Random(f"arith|{split}|{seed}|{','.join(operations)}").shuffle(drawn)
    return [
        _render(instance, lang, f"arith-{split}-{k:05d}-{lang}")
        for lang in languages
        for k, instance in enumerate(drawn)
    ]


def write_problem_set(path: str | os.PathLike[str], problems: Sequence[Problem]) -> None:
    """Write ``problems`` as JSONL records (:meth:`Problem.to_record`), atomically: the file appears
    whole or not at all."""
    with atomic_open(path) as fh:
        for problem in problems:
            fh.write(json.dumps(problem.to_record(), ensure_ascii=False) + "\n")


TASKS: dict[str, Callable[..., list[Problem]]] = {"arith": make_problems}
"""Built-in tasks by name; each builds :class:`Problem` lists with the signature of :func:`make_problems`."""
