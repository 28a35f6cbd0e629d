"""Synthetic long-context tasks generated from a seed (RULER-style; nothing downloaded).

Each generator takes a numpy Generator and a target length in characters and returns a
`Sample`: a prompt whose answer must be found in the long context, and the gold answers.
The same generators feed training mixtures (`data.synthetic`, the text is prompt + answer)
and the evaluation suite, each from its own split: training documents (`split="train"`)
draw on other pseudo-words and another filler than evaluation prompts (`split="eval"`),
so a model can never have seen an evaluation haystack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ..config import Config, register_check, require

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "bi", "do", "fu", "ga", "hi",
              "ju", "pe", "qua", "re", "so", "tu", "wa", "xi", "yo", "mar", "len", "dor", "fin", "gal"]


def word_list(n: int, seed: int = 1234) -> list[str]:
    """n distinct pronounceable pseudo-words, the same for a given seed."""
    rng = np.random.default_rng(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        k = int(rng.integers(2, 4))
        words["".join(rng.choice(_SYLLABLES, k))] = None
    return list(words)


WORDS = word_list(2000)  # evaluation: essay words first, needle keys from WORDS[1500:]
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


@dataclasses.dataclass(frozen=True)
class Style:
    """The material a split's haystacks are made of."""

    words: tuple[str, ...]  # 2000 pseudo-words: the first 1500 fill essays, the rest are keys
    filler: str  # repeated where a task's haystack is filler alone
    varied: bool = False  # true: such haystacks draw `filler_sentences` instead of repeating `filler`


# Training filler: sentences put together from these parts (tens of thousands of them), so that
# a model learns to skip filler it has never seen rather than one memorised paragraph.
_SUBJECTS = ("The river", "A farmer", "The old bridge", "Our neighbour", "The wind", "A small boat",
             "The teacher", "The market", "A quiet road", "The orchard", "The village choir", "A tired horse",
             "The harbour light", "My brother", "The north tower", "A young fox")
_VERBS = ("runs past", "waits near", "looks over", "stands beside", "moves toward", "turns away from",
          "sings about", "walks around", "leans against", "drifts along")
_OBJECTS = ("the hills", "the station", "a stone wall", "the morning fields", "the harbour", "an empty barn",
            "the long valley", "the city gate", "a wooden fence", "the frozen lake", "the bakery")
_ENDINGS = ("", " in spring", " at dawn", " every day", " after the rain", " once more", " before noon",
            " without a sound")


def filler_sentences(rng: np.random.Generator, n_chars: int) -> list[str]:
    """Training filler: about n_chars characters of sentences drawn from the parts above, either
    one short paragraph repeated (as evaluation filler is) or every sentence drawn anew."""
    def sentence() -> str:
        return (f"{_SUBJECTS[rng.integers(len(_SUBJECTS))]} {_VERBS[rng.integers(len(_VERBS))]} "
                f"{_OBJECTS[rng.integers(len(_OBJECTS))]}{_ENDINGS[rng.integers(len(_ENDINGS))]}.")
    paragraph = [sentence() for _ in range(int(rng.integers(2, 6)))] if rng.random() < 0.5 else None
    out, total = [], 0
    while total < n_chars:
        s = paragraph[len(out) % len(paragraph)] if paragraph else sentence()
        out.append(s)
        total += len(s) + 1
    return out


SPLITS = {
    "eval": Style(tuple(WORDS), FILLER),
    "train": Style(tuple(word_list(4000)[2000:]),  # disjoint from the evaluation words
                   "The river runs to the sea. Birds fly over the hills. Rain falls in spring. "
                   "Time moves on. Over the mountains and far away. ", varied=True),
}


def _filler(rng: np.random.Generator, n_chars: int, style: Style) -> list[str]:
    """A haystack of filler alone, about n_chars characters (at least one piece)."""
    if style.varied:
        return filler_sentences(rng, max(n_chars, 1))
    return [style.filler.strip()] * max(1, n_chars // len(style.filler))


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    prompt: str
    answers: tuple[str, ...]
    depth: float | None = None  # relative position of the (first) needle, where there is one

    @property
    def text(self) -> str:
        """The training document: the prompt followed by its answers."""
        return self.prompt + " " + ", ".join(self.answers) + "."


def _essay(rng: np.random.Generator, n_chars: int, style: Style) -> list[str]:
    """Sentences of pseudo-words totalling about n_chars characters."""
    out, total = [], 0
    while total < n_chars:
        k = int(rng.integers(6, 14))
        s = " ".join(rng.choice(style.words[:1500], k)).capitalize() + "."
        out.append(s)
        total += len(s) + 1
    return out


def _insert(sentences: list[str], needles: list[str], depths: list[float]) -> str:
    out = list(sentences)
    for needle, depth in sorted(zip(needles, depths), key=lambda p: -p[1]):
        out.insert(int(round(depth * len(sentences))), needle)
    return " ".join(out)


def _number(rng, digits: int = 7) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def passkey(rng: np.random.Generator, length: int, depth: float | None = None, style: Style = SPLITS["eval"]) -> Sample:
    key = _number(rng, 5)
    depth = float(rng.random()) if depth is None else depth
    head = "There is an important pass key hidden inside a lot of irrelevant text. Find it. "
    question = " What is the pass key? The pass key is"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    body = _insert(_filler(rng, length - len(head) - len(question) - 60, style), [needle], [depth])
    return Sample("passkey", head + body + question, (key,), depth)


def niah(rng: np.random.Generator, length: int, n_keys: int = 1, n_values: int = 1, n_queries: int = 1,
         depth: float | None = None, haystack: str = "essay", task: str = "niah_single",
         style: Style = SPLITS["eval"]) -> Sample:
    """Needles "One of the special magic numbers for KEY is: VALUE."; ask for some keys.

    haystack: "essay" (sentences of pseudo-words), "repeat" (one sentence repeated), or
    "needles" (distractor needles of other keys, the hardest)."""
    keys = [str(k) for k in rng.choice(style.words[1500:], n_keys, replace=False)]
    values = {k: [_number(rng) for _ in range(n_values)] for k in keys}
    needles, depths = [], []
    first = float(rng.random()) if depth is None else depth
    for i, k in enumerate(keys):
        for j, v in enumerate(values[k]):
            needles.append(f"One of the special magic numbers for {k} is: {v}.")
            depths.append(first if (i, j) == (0, 0) else float(rng.random()))
    asked = keys[:n_queries]
    question = (f" What are all the special magic numbers for {', '.join(asked)} mentioned in the "
                f"provided text? The special magic numbers for {', '.join(asked)} mentioned in the provided text are")
    budget = length - sum(len(n) + 1 for n in needles) - len(question) - 20
    if haystack == "repeat":
        sentences = _filler(rng, budget, style)
    elif haystack == "needles":
        others = [w for w in style.words[1500:] if w not in keys]
        sentences, total = [], 0
        while total < budget:
            s = f"One of the special magic numbers for {others[int(rng.integers(len(others)))]} is: {_number(rng)}."
            sentences.append(s)
            total += len(s) + 1
    else:
        sentences = _essay(rng, budget, style)
    body = _insert(sentences, needles, depths)
    answers = tuple(v for k in asked for v in values[k])
    return Sample(task, body + question, answers, first)


def variable_tracking(rng: np.random.Generator, length: int, hops: int = 4, chains: int = 2,
                      style: Style = SPLITS["eval"]) -> Sample:
    """Chains "VAR A = 12345. VAR B = VAR A. ..." in noise; name every variable holding the
    first chain's value (the other chains are distractors)."""
    names = [str(w).upper()[:5] + str(i) for i, w in enumerate(rng.choice(style.words, hops * chains + 8, replace=False))]
    value = _number(rng, 5)
    statements, depths = [], []
    chain_vars = names[:hops]
    for c in range(chains):
        vs = names[c * hops:(c + 1) * hops]
        v0 = value if c == 0 else _number(rng, 5)
        statements.append(f"VAR {vs[0]} = {v0}.")
        statements += [f"VAR {vs[i]} = VAR {vs[i - 1]}." for i in range(1, hops)]
        depths += sorted(float(x) for x in rng.random(hops))
    question = f" Find all variables that are assigned the value {value}. Answer: they are"
    body = _insert(_filler(rng, length - sum(len(s) + 1 for s in statements) - len(question), style),
                   statements, depths)
    return Sample("variable_tracking", body + question, tuple(chain_vars))


def common_words(rng: np.random.Generator, length: int, n_common: int = 10, style: Style = SPLITS["eval"]) -> Sample:
    """A numbered list where n_common words appear far more often than the rest."""
    common = [str(w) for w in rng.choice(style.words, n_common, replace=False)]
    rare_pool = [w for w in style.words if w not in common]
    items: list[str] = []
    total = 0
    while total < length - 120:
        w = common[int(rng.integers(n_common))] if rng.random() < 0.5 else rare_pool[int(rng.integers(len(rare_pool)))]
        items.append(w)
        total += len(w) + 6
    counts = {w: items.count(w) for w in set(items)}
    top = sorted(counts, key=lambda w: (-counts[w], w))[:n_common]
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    question = f" What are the {n_common} most common words in the above list? Answer: the top {n_common} words are"
    return Sample("common_words", "Below is a numbered list of words. " + listing + question, tuple(top))


def frequent_words(rng: np.random.Generator, length: int, n_top: int = 3, alpha: float = 2.0,
                   style: Style = SPLITS["eval"]) -> Sample:
    """Zipf-distributed coded words; name the n_top most frequent."""
    vocab = [str(w) for w in rng.choice(style.words, 200, replace=False)]
    probs = 1.0 / np.arange(1, len(vocab) + 1) ** alpha
    probs /= probs.sum()
    draws = rng.choice(len(vocab), max(n_top * 10, (length - 200) // 3), p=probs)
    chars = np.cumsum([len(vocab[i]) + 1 for i in draws])
    draws = draws[: max(n_top * 10, int(np.searchsorted(chars, length - 200)))]  # about `length` characters
    counts = np.bincount(draws, minlength=len(vocab))
    top = [vocab[i] for i in sorted(range(len(vocab)), key=lambda i: (-counts[i], i))[:n_top]]
    text = " ".join(vocab[i] for i in draws)
    question = f" What are the {n_top} most frequently appeared coded words in the above text? Answer: they are"
    return Sample("frequent_words", "Read the following coded text. " + text + " ..." + question, tuple(top))


def copy(rng: np.random.Generator, length: int, style: Style = SPLITS["eval"]) -> Sample:
    """A line of words and numbers, filler, then the line asked back: copying from anywhere in
    the context by content (the skill behind every retrieval task), with a third or more of the
    document to predict from what came before."""
    head, question = "Remember this line: ", " Now repeat the line:"
    size = int(rng.integers(min(20, length // 3), max(21, length // 3)))
    items, total = [], 0
    while total < size:
        item = (str(style.words[int(rng.integers(len(style.words)))]) if rng.random() < 0.6
                else _number(rng, int(rng.integers(2, 8))))
        items.append(item)
        total += len(item) + 1
    line = " ".join(items)
    rest = length - len(head) - 2 * len(line) - len(question) - 4
    body = " ".join(_filler(rng, rest, style)) if rest > 20 else ""
    return Sample("copy", " ".join(filter(None, [f"{head}{line}.", body, question.strip()])), (line,))


TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    "niah_single": lambda rng, length, **kw: niah(rng, length, task="niah_single", **kw),
    "niah_single_repeat": lambda rng, length, **kw: niah(rng, length, haystack="repeat",
                                                         task="niah_single_repeat", **kw),
    "niah_multikey": lambda rng, length, **kw: niah(rng, length, n_keys=4, task="niah_multikey", **kw),
    "niah_multikey_needles": lambda rng, length, **kw: niah(rng, length, haystack="needles",
                                                            task="niah_multikey_needles", **kw),
    "niah_multivalue": lambda rng, length, **kw: niah(rng, length, n_values=4, task="niah_multivalue", **kw),
    "niah_multiquery": lambda rng, length, **kw: niah(rng, length, n_keys=4, n_queries=2,
                                                      task="niah_multiquery", **kw),
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
    "copy": copy,
}
RULER = tuple(t for t in TASKS if t != "copy")  # the evaluation suite's default tasks


def generate(task: str, seed: int, index: int, length: int, split: str = "eval", **kwargs) -> Sample:
    """Sample `index` of `task` for `seed` from `split`'s material ("eval" or "train"): the
    same inputs always give the same sample."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r} (known: {', '.join(TASKS)})")
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r} (known: {', '.join(SPLITS)})")
    rng = np.random.default_rng([seed, index, sorted(TASKS).index(task), *([1] if split == "train" else [])])
    return TASKS[task](rng, length, style=SPLITS[split], **kwargs)


@register_check
def _check_tasks(cfg: Config) -> None:
    for name in cfg.data.synthetic:
        require(name in TASKS, f"data.synthetic.{name}", f"unknown task (known: {', '.join(TASKS)})")
