"""Tasks: clean and corrupted prompts, the answer and the wrong token for each, and a metric.

A task is what the attribution, patching and steering analyses ask about: "how much does the
model prefer the answer to the wrong token, and which components make it do so". Built in:

- `ioi`: indirect object identification. Clean "When Mary and John went to the store, John
  gave a drink to" -> " Mary" (wrong: " John"); corrupted: the second "John" replaced by a third
  name (the IOI paper's ABC prompts), which leaves the model no reason to prefer either name.
  Metric: logit difference answer - wrong.
- `greater_than`: clean "The war lasted from the year 1732 to the year 17"; corrupted: the
  start year "1701". Metric: probability difference, the probability of the two-digit years
  above the start year minus those below it (the greater-than paper's metric).
- `sva`: subject-verb agreement across an attractor or relative clause. Clean "The keys on the
  cabinet" -> " are" (wrong " is"); corrupted: the subject's number flipped ("The key on the
  cabinet"). Metric: logit difference.
- `induction`: random tokens, then the first half of them again; the answer is the token that
  followed last time. Corrupted: that earlier token replaced by another, which becomes the
  wrong token. Metric: logit difference.
- `custom_task`: a clean and a corrupted prompt typed by the user and two answers, validated.

Prompts are generated as text for the current model's vocabulary: the zoo models' (with
held-out names and templates, `split="held_out"`, or training ones, `split="train"`) and GPT-2's
(the IOI and greater-than prompts of the papers tokenize unchanged there). Every prompt of a
task has the same token length, so a task is one batch.

The metrics take logits only; `normalised` maps them so the clean run is 1 and the corrupted 0.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from transformer_lens import HookedTransformer

from core import corpus, store
from core.store import run
from core.task_catalog import BATCH, LABELS, templates  # noqa: F401  (re-exported: tasks.LABELS)

Split = Literal["held_out", "train"]
MetricKind = Literal["logit_diff", "prob_diff"]
DEFAULT_BATCH = BATCH
INDUCTION_LEN = 20


class TaskError(ValueError):
    """A task cannot be built or used; the message is meant for the person who asked.

    `suggestion`, when set, is a value the person could use instead (say, the first token of an
    answer that is several tokens).
    """

    def __init__(self, message: str, suggestion: str | None = None):
        super().__init__(message)
        self.suggestion = suggestion


@dataclass
class Task:
    name: str
    description: str
    metric_kind: MetricKind
    clean_tokens: torch.Tensor  # [batch, pos], BOS first
    corrupted_tokens: torch.Tensor  # [batch, pos]
    answers: torch.Tensor  # [batch] token ids
    wrongs: torch.Tensor  # [batch] token ids
    clean_prompts: list[str]
    corrupted_prompts: list[str]
    # prob_diff tasks: which tokens count for (answer_sets) and against (wrong_sets) the answer.
    answer_sets: torch.Tensor | None = None  # [batch, d_vocab] bool
    wrong_sets: torch.Tensor | None = None
    template: str = ""
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.clean_tokens.shape[0])

    @property
    def metric_label(self) -> str:
        return "logit difference (answer − wrong)" if self.metric_kind == "logit_diff" else "probability difference"

    def per_prompt(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch] metric of each prompt from logits [batch, pos, d_vocab] (the last position is read)."""
        last = logits[:, -1, :].float()
        if self.metric_kind == "logit_diff":
            idx = torch.arange(last.shape[0])
            return last[idx, self.answers] - last[idx, self.wrongs]
        probs = last.softmax(-1)
        return (probs * self.answer_sets).sum(-1) - (probs * self.wrong_sets).sum(-1)

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The task metric: the mean of `per_prompt` over the batch (a 0-d tensor)."""
        return self.per_prompt(logits).mean()

    def accuracy(self, logits: torch.Tensor) -> float:
        """Share of prompts where the answer beats the wrong token (or set)."""
        return float((self.per_prompt(logits) > 0).float().mean())


def normalised(value: float | torch.Tensor, clean: float, corrupted: float):
    """(value - corrupted) / (clean - corrupted): 1 = clean behaviour, 0 = corrupted behaviour."""
    gap = clean - corrupted
    if abs(float(gap)) < 1e-9:
        raise TaskError("The clean and corrupted runs score the same, so the metric cannot be normalised.")
    return (value - corrupted) / gap


MIN_EFFECT = 0.5  # clean - corrupted gap in pooled standard deviations of the per-prompt metric


@dataclass(frozen=True)
class Normaliser:
    """Maps a task metric so that the clean run is 1 and the corrupted run 0, and says whether that
    is meaningful.

    Normalising divides by the gap clean - corrupted. When the model barely shows the behaviour
    (a template it fails), that gap is small against how much the metric varies from prompt to
    prompt, and every normalised number is noise divided by a small number (seen: +26.7 for one
    ablation). `effect` is the gap in pooled standard deviations of the per-prompt metric (Cohen's
    d; None for a single prompt); below MIN_EFFECT the normalised numbers are not meaningful.
    """

    clean: float
    corrupted: float
    effect: float | None

    @property
    def gap(self) -> float:
        return self.clean - self.corrupted

    @property
    def meaningful(self) -> bool:
        if abs(self.gap) < 1e-9:
            return False
        return self.effect is None or self.effect >= MIN_EFFECT

    def problem(self, metric_label: str) -> str | None:
        """Why the normalised numbers are not meaningful, for the person looking at them (None if they are)."""
        if abs(self.gap) < 1e-9:
            return ("The clean and corrupted runs score the same, so there is nothing to restore or destroy: "
                    "make the corrupted prompt change the answer.")
        if self.meaningful:
            return None
        if self.gap < 0:
            what = "the model prefers the wrong answer more on the clean prompts than on the corrupted ones"
        else:
            what = (f"the clean and corrupted runs differ by only {self.gap:+.3f} in {metric_label}, "
                    f"{self.effect:.2f} standard deviations of its spread over the prompts")
        return (f"The model does not show this behaviour here: {what}. Normalised numbers (divided by that gap) "
                "would be noise, so the charts show each run's change in the metric from the unpatched run instead. "
                "Pick a template or task where the model does it (a trained template).")

    def __call__(self, values):
        """Normalised values: 1 = the clean run's metric, 0 = the corrupted run's."""
        return normalised(values, self.clean, self.corrupted)

    def change_from_clean(self, values) -> torch.Tensor:
        """[n] what ablating each component did to the metric of the clean run: the change in the
        normalised metric (0 = none, -1 = the clean behaviour gone) where that is meaningful, else
        in the raw metric (`change_label` says which)."""
        values = torch.as_tensor(values, dtype=torch.float32)
        return self(values) - 1.0 if self.meaningful else values - self.clean

    @property
    def change_label(self) -> str:
        return "Δ normalised metric" if self.meaningful else "Δ metric from the clean run"


def normaliser(task: "Task", clean_logits: torch.Tensor, corrupted_logits: torch.Tensor) -> Normaliser:
    """The task's Normaliser from the clean and corrupted runs' logits [batch, pos, d_vocab]."""
    clean, corrupted = task.per_prompt(clean_logits), task.per_prompt(corrupted_logits)
    effect = None
    if len(clean) > 1:
        pooled = float(((clean.var() + corrupted.var()) / 2).sqrt())
        gap = float(clean.mean() - corrupted.mean())
        effect = gap / pooled if pooled > 0 else (float("inf") if gap > 0 else float("-inf"))
    return Normaliser(float(clean.mean()), float(corrupted.mean()), effect)


DEMO_ORDER = ("ioi", "sva", "greater_than", "induction")  # the order a page picks a demonstration task in
MIN_DEMO_ACCURACY = 0.8


def solves(task: "Task", clean_logits: torch.Tensor, corrupted_logits: torch.Tensor,
           min_accuracy: float = MIN_DEMO_ACCURACY) -> bool:
    """Whether the model does the task, from its clean and corrupted runs' logits [batch, pos, d_vocab]:
    the answer beats the wrong token on at least `min_accuracy` of the clean prompts, and the
    clean - corrupted gap makes normalised numbers meaningful."""
    return task.accuracy(clean_logits) >= min_accuracy and normaliser(task, clean_logits, corrupted_logits).meaningful


@dataclass(frozen=True)
class Baselines:
    clean: float
    corrupted: float
    clean_accuracy: float
    corrupted_accuracy: float


def baselines(model: HookedTransformer, task: Task) -> Baselines:
    """The task metric on the clean and on the corrupted prompts (plain forward passes)."""
    with torch.no_grad():
        clean_logits = run(model, task.clean_tokens)
        corrupted_logits = run(model, task.corrupted_tokens)
    return Baselines(
        float(task.metric(clean_logits)), float(task.metric(corrupted_logits)),
        task.accuracy(clean_logits), task.accuracy(corrupted_logits),
    )


# ---------------------------------------------------------------------------------------------
# Vocabulary helpers
# ---------------------------------------------------------------------------------------------


def single_token(model: HookedTransformer, text: str) -> int | None:
    """The id of `text` if it is exactly one token (without BOS), else None."""
    toks = store.to_tokens(model, text, prepend_bos=False)[0]
    if toks.numel() != 1 or _is_unknown(model, int(toks[0])):
        return None
    return int(toks[0])


def _is_unknown(model: HookedTransformer, token: int) -> bool:
    unk = getattr(model.tokenizer, "unk_token_id", None)
    return unk is not None and token == unk


def _single_words(model: HookedTransformer, words: list[str], capital: bool = False) -> list[str]:
    """The words that are one token after a space in this model's vocabulary."""
    out = []
    for w in words:
        shown = corpus.capitalised(w) if capital else w
        if single_token(model, " " + shown) is not None:
            out.append(w)
    return out


def _tokens(model: HookedTransformer, prompts: list[str]) -> torch.Tensor:
    toks = [store.to_tokens(model, p, prepend_bos=True)[0] for p in prompts]
    lengths = {t.numel() for t in toks}
    if len(lengths) != 1:
        raise TaskError(f"The generated prompts tokenize to different lengths ({sorted(lengths)}).")
    out = torch.stack(toks)
    if out.shape[1] > model.cfg.n_ctx:
        raise TaskError(f"The prompts are {out.shape[1]} tokens; the model's context is {model.cfg.n_ctx}.")
    return out


def _split_template(text: str) -> tuple[str, str]:
    """(prompt part, separator before the answer) of a corpus template."""
    before = text.split("{answer}")[0]
    return (before[:-1], " ") if before.endswith(" ") else (before, "")


def _pick_template(options: list[corpus.Template], split: Split, template: str | None) -> corpus.Template:
    if template is not None:
        for t in options:
            if t.name == template:
                return t
        raise TaskError(f"Unknown template '{template}'. Known: {', '.join(t.name for t in options)}.")
    candidates = [t for t in options if t.held_out == (split == "held_out")]
    return candidates[0]


def _check_split(split: str) -> None:
    if split not in ("held_out", "train"):
        raise TaskError(f"Unknown split '{split}': use 'held_out' or 'train'.")


def _names(model: HookedTransformer, split: Split) -> list[str]:
    train, held_out = corpus.split_names()
    names = _single_words(model, held_out if split == "held_out" else train, capital=True)
    if len(names) < 3:
        raise TaskError("This model's vocabulary has fewer than three single-token names, so IOI cannot be built.")
    return names


def _need(words: list[str], what: str) -> list[str]:
    if not words:
        raise TaskError(f"This model's vocabulary has no single-token {what}.")
    return words


# ---------------------------------------------------------------------------------------------
# Built-in tasks
# ---------------------------------------------------------------------------------------------


def ioi(model: HookedTransformer, n: int = DEFAULT_BATCH, seed: int = 0, split: Split = "held_out",
        template: str | None = None) -> Task:
    """Indirect object identification, half ABBA and half BABA, with ABC corrupted prompts."""
    _check_split(split)
    tpl = _pick_template(corpus.IOI_TEMPLATES, split, template)
    text, sep = _split_template(tpl.text)
    names = _names(model, split)
    places = _need(_single_words(model, corpus.PLACES), "places")
    objects = _need(_single_words(model, corpus.OBJECTS), "objects")
    rng = random.Random(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    for i in range(n):
        io, s, c = rng.sample(names, 3)
        io, s, c = corpus.capitalised(io), corpus.capitalised(s), corpus.capitalised(c)
        a, b = (io, s) if i % 2 == 0 else (s, io)
        slots = dict(a=a, b=b, place=rng.choice(places), obj=rng.choice(objects))
        clean.append(text.format(s=s, **slots))
        corrupted.append(text.format(s=c, **slots))
        answers.append(sep + io)
        wrongs.append(sep + s)
    return _finish(model, "ioi", "Indirect object: the name that was not repeated", "logit_diff",
                   clean, corrupted, answers, wrongs, tpl.name, {"orders": ["ABBA", "BABA"] * (n // 2) + ["ABBA"] * (n % 2)})


def greater_than(model: HookedTransformer, n: int = DEFAULT_BATCH, seed: int = 0, split: Split = "held_out",
                 template: str | None = None) -> Task:
    """Greater-than: years after the start year vs before it; corrupted start year "01"."""
    _check_split(split)
    tpl = _pick_template(corpus.GT_TEMPLATES, split, template)
    text, sep = _split_template(tpl.text)
    events = _need(_single_words(model, corpus.EVENTS), "events")
    centuries = _need(_single_words(model, corpus.CENTURIES[:-1]), "centuries")
    rng = random.Random(seed)
    clean, corrupted, starts = [], [], []
    for _ in range(n):
        slots = dict(event=rng.choice(events), cc=rng.choice(centuries))
        yy = rng.randint(2, 97)
        clean.append(text.format(yy=f"{yy:02d}", **slots))
        corrupted.append(text.format(yy="01", **slots))
        starts.append(yy)
    year_ids = _two_digit_ids(model, clean[0], sep)
    d_vocab = model.cfg.d_vocab
    answer_sets = torch.zeros(n, d_vocab, dtype=torch.bool)
    wrong_sets = torch.zeros(n, d_vocab, dtype=torch.bool)
    answers, wrongs = [], []
    for b, yy in enumerate(starts):
        answer_sets[b, year_ids[yy + 1 :]] = True
        wrong_sets[b, year_ids[:yy]] = True
        # One representative token each, for single-token views: the middle of either range.
        answers.append(sep + f"{(yy + 1 + 99) // 2:02d}")
        wrongs.append(sep + f"{(yy - 1) // 2:02d}")
    return _finish(model, "greater_than", "Greater-than: an end year after the start year", "prob_diff",
                   clean, corrupted, answers, wrongs, tpl.name, {"start_years": starts},
                   answer_sets=answer_sets, wrong_sets=wrong_sets)


def _two_digit_ids(model: HookedTransformer, prompt: str, sep: str) -> torch.Tensor:
    """Token ids of the 100 two-digit year endings as they continue `prompt`."""
    ids = [continuation_token(model, prompt, sep + f"{y:02d}") for y in range(100)]
    if any(i is None for i in ids) or len(set(ids)) != 100:
        missing = [f"{y:02d}" for y, i in enumerate(ids) if i is None]
        raise TaskError(
            "This model's tokenizer does not split years into a century and a two-digit token"
            + (f" (not one token after the century: {', '.join(missing[:5])}{'…' if len(missing) > 5 else ''})." if missing else ".")
        )
    return torch.tensor(ids)


def sva(model: HookedTransformer, n: int = DEFAULT_BATCH, seed: int = 0, split: Split = "held_out",
        template: str | None = None, attractor: Literal["opposite", "same", "random"] = "opposite") -> Task:
    """Subject-verb agreement: " are" vs " is" after an attractor; corrupted flips the subject's number.

    `attractor="opposite"` gives the attractor (or relative-clause subject) the other number
    than the subject: the hard case. Half the prompts have a plural subject.
    """
    _check_split(split)
    tpl = _pick_template(corpus.SVA_TEMPLATES, split, template)
    text, sep = _split_template(tpl.text)
    pairs = lambda items: [p for p in items if all(single_token(model, " " + w) is not None for w in p)]  # noqa: E731
    things, people, verbs = pairs(corpus.THINGS), pairs(corpus.PEOPLE), pairs(corpus.VERBS)
    attractors = pairs(corpus.THINGS + corpus.BEINGS)
    for what, items in (("nouns", things), ("people", people), ("verbs", verbs)):
        _need(items, what)
    rng = random.Random(seed)
    clean, corrupted, answers, wrongs = [], [], [], []
    for i in range(n):
        plural = i % 2 == 0
        attr_plural = {"opposite": not plural, "same": plural, "random": rng.random() < 0.5}[attractor]
        subj = rng.choice(things)
        attr = rng.choice([a for a in attractors if a != subj])
        slots = dict(attr=attr[attr_plural], agent=rng.choice(people)[attr_plural], verb=rng.choice(verbs)[attr_plural])
        clean.append(text.format(subj=subj[plural], **slots))
        corrupted.append(text.format(subj=subj[not plural], **slots))
        answers.append(sep + ("are" if plural else "is"))
        wrongs.append(sep + ("is" if plural else "are"))
    clean = [corpus.capitalised(p) for p in clean]
    corrupted = [corpus.capitalised(p) for p in corrupted]
    return _finish(model, "sva", "Agreement: the verb agrees with the subject, not the attractor", "logit_diff",
                   clean, corrupted, answers, wrongs, tpl.name, {"attractor": attractor})


INDUCTION_CORRUPTIONS = ("continuation", "match")


def induction(model: HookedTransformer, n: int = DEFAULT_BATCH, seed: int = 0, split: Split = "held_out",
              length: int = INDUCTION_LEN, corruption: str = "continuation") -> Task:
    """Random tokens, then their first half again: the answer is the token that came next before.

    Corrupted ("continuation"): that earlier token is replaced by another one (the wrong token), so
    induction now predicts the wrong token — the information that changes is the copied token
    (the induction head's value path).
    Corrupted ("match"): the earlier occurrence of the last token is replaced by a token found
    nowhere else in the prompt, so there is nothing to match and no repeat to continue; the wrong
    token is a random token other than the answer and the tokens before it — what changes is
    where the induction head looks (its key path, fed by the previous-token head).
    `split` is accepted for a uniform signature; random tokens are never in any training set.
    """
    _check_split(split)
    if corruption not in INDUCTION_CORRUPTIONS:
        raise TaskError(f"Unknown induction corruption {corruption!r}: {', '.join(INDUCTION_CORRUPTIONS)}.")
    if 1 + length + length // 2 > model.cfg.n_ctx:
        raise TaskError(f"Induction prompts of {length} tokens do not fit the model's context {model.cfg.n_ctx}.")
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    allowed = [i for i in range(model.cfg.d_vocab) if i not in special]
    rng = random.Random(seed)
    bos = model.tokenizer.bos_token_id
    k = length // 2
    clean_rows, corrupted_rows, answers, wrongs = [], [], [], []
    for _ in range(n):
        x = rng.sample(allowed, length)
        w = rng.choice([t for t in allowed if t not in x[: k + 1]])
        if corruption == "continuation":
            x_corrupt = x[:k] + [w] + x[k + 1 :]
        else:  # the earlier x[k - 1] becomes a token found nowhere else in the prompt
            u = rng.choice([t for t in allowed if t not in x and t != w])
            x_corrupt = x[: k - 1] + [u] + x[k:]
        clean_rows.append([bos] + x + x[:k])
        corrupted_rows.append([bos] + x_corrupt + x[:k])
        answers.append(x[k])
        wrongs.append(w)
    clean_tokens, corrupted_tokens = torch.tensor(clean_rows), torch.tensor(corrupted_rows)
    decode = lambda rows: [store.decode(model, r[1:]) for r in rows]  # noqa: E731
    return Task("induction", "Induction: repeat what followed last time", "logit_diff", clean_tokens, corrupted_tokens,
                torch.tensor(answers), torch.tensor(wrongs), decode(clean_rows), decode(corrupted_rows),
                template=f"random-{length}", info={"length": length, "corruption": corruption})


BUILTIN: dict[str, Callable[..., Task]] = {"ioi": ioi, "greater_than": greater_than, "sva": sva, "induction": induction}
def make_task(name: str, model: HookedTransformer, n: int = DEFAULT_BATCH, seed: int = 0,
              split: Split = "held_out", **kwargs) -> Task:
    """A built-in task by name."""
    if name not in BUILTIN:
        raise TaskError(f"Unknown task '{name}'. Built in: {', '.join(BUILTIN)}.")
    if not 1 <= n <= 1024:
        raise TaskError(f"Batch size {n} is out of range (1–1024).")
    return BUILTIN[name](model, n=n, seed=seed, split=split, **kwargs)


# ---------------------------------------------------------------------------------------------
# Custom tasks and shared construction
# ---------------------------------------------------------------------------------------------


def continuation_token(model: HookedTransformer, prompt: str, continuation: str) -> int | None:
    """The one token `continuation` adds after `prompt`, or None if it adds several or changes the prompt's tokens."""
    base = store.to_tokens(model, prompt)[0]
    full = store.to_tokens(model, prompt + continuation)[0]
    if full.numel() != base.numel() + 1 or not torch.equal(full[:-1], base) or _is_unknown(model, int(full[-1])):
        return None
    return int(full[-1])


def _finish(model, name, description, kind, clean, corrupted, answers, wrongs, template, info,
            answer_sets=None, wrong_sets=None) -> Task:
    clean_tokens, corrupted_tokens = _tokens(model, clean), _tokens(model, corrupted)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise TaskError("Clean and corrupted prompts tokenize to different lengths in this model.")
    answer_ids, wrong_ids = [], []
    for prompt, ans, wrong in zip(clean, answers, wrongs):
        a, w = continuation_token(model, prompt, ans), continuation_token(model, prompt, wrong)
        if a is None or w is None:
            raise TaskError(f"In this model, {ans!r} or {wrong!r} is not one token after {prompt!r}.")
        answer_ids.append(a)
        wrong_ids.append(w)
    return Task(name, description, kind, clean_tokens, corrupted_tokens, torch.tensor(answer_ids),
                torch.tensor(wrong_ids), clean, corrupted, answer_sets, wrong_sets, template, info)


def answer_token(model: HookedTransformer, text: str, which: str = "answer", prepend_space: bool = True,
                 known: dict[str, int] | None = None) -> int:
    """The single token id of an answer typed as text; TaskError (with the first token as
    `suggestion`) when it is empty, several tokens or unknown to the model.

    With `prepend_space` (as TransformerLens's `test_prompt`), "Mary" means " Mary", the way
    GPT-2 spells a word after a space. `known`: texts whose token is known by id (a page's default
    answers, decoded from the model's top tokens: "##61" shows as "61", GPT-2's "," is not " ,",
    so their text need not tokenise back to them).
    """
    if known and text in known:
        return known[text]
    if not text or not text.strip():
        raise TaskError(f"The {which} is empty: type the token the model should predict.")
    shown = " " + text if prepend_space and not text[0].isspace() else text
    toks = store.to_tokens(model, shown, prepend_bos=False)[0]
    if toks.numel() != 1:
        pieces = store.str_tokens(model, toks)
        first = pieces[0] if pieces else ""
        raise TaskError(
            f"The {which} {shown!r} is {len(pieces)} tokens ({', '.join(repr(p) for p in pieces)}); it must be "
            f"a single token. Try its first token, {first!r}.",
            suggestion=first,
        )
    if _is_unknown(model, int(toks[0])):
        raise TaskError(f"The {which} {shown.strip()!r} is not in this model's vocabulary.")
    return int(toks[0])


def custom_task(model: HookedTransformer, clean: str, corrupted: str, answer: str, wrong: str,
                prepend_space: bool = True, known: dict[str, int] | None = None) -> Task:
    """A one-prompt task from typed text, validated with readable messages (TaskError).

    The answers are single tokens; with `prepend_space` (as TransformerLens's `test_prompt`)
    " Mary" is meant when "Mary" is typed, as GPT-2 spells a word after a space. `known`: see
    `answer_token`.
    """
    for label, text in (("clean prompt", clean), ("corrupted prompt", corrupted)):
        if not text or not text.strip():
            raise TaskError(f"The {label} is empty.")
    answer_id = answer_token(model, answer, "answer", prepend_space, known)
    wrong_id = answer_token(model, wrong, "wrong answer", prepend_space, known)
    if answer_id == wrong_id:
        raise TaskError("The answer and the wrong answer are the same token; the metric would always be 0.")
    clean_tokens = store.to_tokens(model, clean)
    corrupted_tokens = store.to_tokens(model, corrupted)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise TaskError(
            f"The clean prompt is {clean_tokens.shape[1] - 1} tokens and the corrupted prompt "
            f"{corrupted_tokens.shape[1] - 1}: they must be the same length, so that each position "
            "can be patched. Change words for words of one token each."
        )
    if clean_tokens.shape[1] > model.cfg.n_ctx:
        raise TaskError(f"The prompts are {clean_tokens.shape[1]} tokens; the model's context is {model.cfg.n_ctx}.")
    return Task("custom", "Custom prompt pair", "logit_diff", clean_tokens, corrupted_tokens,
                torch.tensor([answer_id]), torch.tensor([wrong_id]), [clean], [corrupted], template="custom")
