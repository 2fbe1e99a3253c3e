"""Guided lessons: files of steps under assets/lessons/, checked when they load, and the questions
the app grades from its own computation.

A lesson is a TOML file (docs/lessons.md has the format):

    [lesson]
    title = "Induction heads"
    minutes = 45
    summary = "…"

    [[steps]]
    title = "The induction stripe"
    text = '''Markdown shown beside the live view.'''
    view = { page = "attention", model = "ce-induction-2l", prompt = "…", layer = 1, head = 0 }
    check = { answer = "top_induction_head", question = "Which head is the induction head? Click it." }

`view` is the URL state the pages understand (model; a prompt or a task's source, template and
example; layer, head, SAE, feature; and each page's URL-bound controls, `frame.PageSpec.bound`).
`check` names a grader of `GRADERS`: the right answer is computed on the model the student has
loaded, never written in the file. Everything a step names is checked when the lesson loads
(`load_lessons`), so a wrong page, head, task or grader is an error then, not when a student
reaches the step.

Pure: no Streamlit. The lesson page and panel are in core/ui/lessons.py and pages/lessons.py.
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core import paths

LESSONS_DIR = paths.ROOT / "assets" / "lessons"
VIEW_KEYS = ("page", "model", "prompt", "source", "template", "example", "layer", "head", "sae", "feature")
STEP_KEYS = ("title", "text", "view", "check")
CHECK_KEYS = ("answer", "question", "params")
LESSON_KEYS = ("title", "minutes", "summary")


class LessonError(ValueError):
    """A lesson file that cannot be used: says which file, which step and what is wrong."""


# ---------------------------------------------------------------------------------------------
# The format
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    answer: str  # a name in GRADERS
    question: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    title: str
    text: str
    view: dict  # page, model, prompt/source/…, bound controls
    check: Check | None = None

    @property
    def page(self) -> str:
        return self.view["page"]

    def query_params(self) -> dict[str, str]:
        """The URL query parameters that open this step's view (without `page`): the sidebar's
        view as text, the page's bound controls by their labels (what Streamlit puts in a URL)."""
        bound = _page_specs()[self.page].bound
        return {k: bound[k][v] if k in bound else str(v) for k, v in self.view.items() if k != "page"}

    def widget_state(self) -> dict:
        """The page's bound controls by their option values (what session state holds)."""
        bound = _page_specs()[self.page].bound
        return {k: v for k, v in self.view.items() if k in bound}


@dataclass(frozen=True)
class Lesson:
    number: int  # from the file name's leading digits: 01-… is lesson 1
    slug: str  # the file name without its number and extension
    title: str
    minutes: int
    summary: str
    steps: tuple[Step, ...]
    path: Path

    def step(self, i: int) -> Step:
        return self.steps[i - 1]  # steps are numbered from 1, as the URL says "2.4"


def _zoo_config(model: str) -> dict | None:
    path = paths.ZOO_DIR / model / "hooked_config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _sae_config(sae: str) -> dict | None:
    path = paths.SAE_DIR / sae / "cfg.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _page_specs() -> dict:
    from core.ui.frame import BY_KEY  # the pages and their URL-bound controls (light: no torch)

    return BY_KEY


def check_view(view: dict, where: str) -> None:
    """Raise LessonError when a step's view names something the app does not have."""
    from core import task_catalog

    specs = _page_specs()
    for key, kind in (("page", str), ("model", str), ("prompt", str), ("source", str), ("template", str), ("sae", str),
                      ("layer", int), ("head", int), ("example", int), ("feature", int)):
        if key in view and (not isinstance(view[key], kind) or isinstance(view[key], bool)):
            raise LessonError(f"{where}: {key} is {'text' if kind is str else 'a whole number'}, not {view[key]!r}.")
    unknown = [k for k in view if k not in VIEW_KEYS and not any(k in s.bound for s in specs.values())]
    if unknown:
        raise LessonError(f"{where}: unknown view setting(s) {', '.join(map(repr, unknown))}.")
    page = view.get("page")
    if page not in specs:
        raise LessonError(f"{where}: unknown page {page!r} (pages: {', '.join(specs)}).")
    spec = specs[page]
    for key, value in view.items():
        if key in VIEW_KEYS:
            continue
        if key not in spec.bound:
            raise LessonError(f"{where}: the {page} page has no control {key!r} (it has: "
                              f"{', '.join(spec.bound) or 'none'}).")
        options = spec.bound[key]
        if not isinstance(value, (str, bool)) or value not in options or type(value) is not type(next(iter(options))):
            raise LessonError(f"{where}: {key} = {value!r} is not one of {', '.join(map(repr, spec.bound[key]))}.")
    model = view.get("model")
    if model is None:
        raise LessonError(f"{where}: a view names its model (an embedded model, so the lesson works offline).")
    cfg = _zoo_config(model)
    if cfg is None:
        raise LessonError(f"{where}: unknown model {model!r} (not an embedded model in assets/models).")
    if "prompt" in view and "source" in view:
        raise LessonError(f"{where}: a view has a typed prompt or a task source, not both.")
    if "prompt" in view and not str(view["prompt"]).strip():
        raise LessonError(f"{where}: the prompt is empty.")
    source = view.get("source")
    if source is not None:
        if source not in task_catalog.LABELS:
            raise LessonError(f"{where}: unknown task {source!r} (tasks: {', '.join(task_catalog.LABELS)}).")
        template = view.get("template")
        names = [t.name for t in task_catalog.templates(source)]
        if template is not None and template not in names:
            raise LessonError(f"{where}: task {source!r} has no template {template!r} (it has: {', '.join(names)}).")
        example = view.get("example", 0)
        if not isinstance(example, int) or not 0 <= example < task_catalog.BATCH:
            raise LessonError(f"{where}: example {example!r} is not in 0–{task_catalog.BATCH - 1}.")
    elif "template" in view or "example" in view:
        raise LessonError(f"{where}: template and example go with a task source.")
    for key, size in (("layer", cfg["n_layers"]), ("head", cfg["n_heads"])):
        if key in view and not (isinstance(view[key], int) and 0 <= view[key] < size):
            raise LessonError(f"{where}: {key} {view[key]!r} does not exist in {model} "
                              f"({cfg['n_layers']} layers × {cfg['n_heads']} heads).")
    if "sae" in view:
        sae_cfg = _sae_config(str(view["sae"]))
        if sae_cfg is None:
            raise LessonError(f"{where}: unknown SAE {view['sae']!r} (not an embedded SAE in assets/saes).")
        if not str(view["sae"]).startswith(model + "-"):
            raise LessonError(f"{where}: SAE {view['sae']!r} was not trained on {model}.")
        if "feature" in view and not (isinstance(view["feature"], int) and 0 <= view["feature"] < sae_cfg["d_sae"]):
            raise LessonError(f"{where}: feature {view['feature']!r} is not in 0–{sae_cfg['d_sae'] - 1}.")
    elif "feature" in view:
        raise LessonError(f"{where}: a feature goes with an SAE (`sae = …`).")


def _check(raw: Any, where: str, view: dict) -> Check | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise LessonError(f"{where}: `check` is a table with `answer` and `question`.")
    extra = set(raw) - set(CHECK_KEYS)
    if extra:
        raise LessonError(f"{where}: unknown check setting(s) {', '.join(sorted(extra))}.")
    answer, question = raw.get("answer"), raw.get("question")
    if answer not in GRADERS:
        raise LessonError(f"{where}: unknown check {answer!r} (checks: {', '.join(GRADERS)}).")
    if not isinstance(question, str) or not question.strip():
        raise LessonError(f"{where}: the check needs a `question`.")
    grader = GRADERS[answer]
    params = raw.get("params", {})
    if not isinstance(params, dict) or set(params) - set(grader.params):
        raise LessonError(f"{where}: check {answer!r} takes the params {', '.join(grader.params) or 'none'}.")
    for name, value in params.items():
        allowed = grader.params[name]
        ok = value in allowed if isinstance(allowed, tuple) else isinstance(value, allowed) and not isinstance(value, bool)
        if not ok:
            raise LessonError(f"{where}: check {answer!r}: {name} = {value!r} is not "
                              + (f"one of {', '.join(map(repr, allowed))}." if isinstance(allowed, tuple) else
                                 "a whole number."))
    if grader.needs_task and "source" not in view:
        raise LessonError(f"{where}: check {answer!r} needs a task view (`source = …`).")
    if grader.needs_sae and "sae" not in view:
        raise LessonError(f"{where}: check {answer!r} needs an SAE in the view (`sae = …`).")
    return Check(answer, question.strip(), dict(params))


def parse_lesson(text: str, path: Path) -> Lesson:
    """A lesson from its TOML text; LessonError (naming the file and step) when anything is wrong."""
    name = path.name
    stem = path.stem
    digits = stem.split("-", 1)[0]
    if not digits.isdigit() or "-" not in stem:
        raise LessonError(f"{name}: a lesson file is named NN-slug.toml (e.g. 05-my-lesson.toml).")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise LessonError(f"{name}: not valid TOML: {err}") from None
    head = data.get("lesson")
    if not isinstance(head, dict):
        raise LessonError(f"{name}: no [lesson] table (title, minutes, summary).")
    extra = set(head) - set(LESSON_KEYS)
    if extra or not isinstance(head.get("title"), str) or not isinstance(head.get("minutes"), int):
        raise LessonError(f"{name}: [lesson] has a title (text), minutes (a whole number) and a summary"
                          + (f"; unknown: {', '.join(sorted(extra))}" if extra else "") + ".")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise LessonError(f"{name}: no steps ([[steps]] tables).")
    unknown_top = set(data) - {"lesson", "steps"}
    if unknown_top:
        raise LessonError(f"{name}: unknown table(s) {', '.join(sorted(unknown_top))}.")
    steps = []
    for i, raw in enumerate(raw_steps, 1):
        where = f"{name}, step {int(digits)}.{i}"
        extra = set(raw) - set(STEP_KEYS)
        if extra:
            raise LessonError(f"{where}: unknown step setting(s) {', '.join(sorted(extra))}.")
        if not isinstance(raw.get("title"), str) or not isinstance(raw.get("text"), str):
            raise LessonError(f"{where}: a step has a title and a text.")
        view = raw.get("view")
        if not isinstance(view, dict):
            raise LessonError(f"{where}: a step has a view (`view = {{ page = …, model = … }}`).")
        check_view(view, where)
        steps.append(Step(raw["title"], raw["text"].strip(), dict(view), _check(raw.get("check"), where, view)))
    return Lesson(int(digits), stem.split("-", 1)[1], head["title"], head["minutes"], head.get("summary", ""),
                  tuple(steps), path)


def load_lessons(folder: Path | None = None) -> list[Lesson]:
    """Every lesson file in `folder` (default assets/lessons), ordered by number; LessonError on the
    first file that does not check."""
    folder = Path(folder or LESSONS_DIR)
    lessons = [parse_lesson(p.read_text(encoding="utf-8"), p) for p in sorted(folder.glob("*.toml"))]
    numbers = [lesson.number for lesson in lessons]
    if len(set(numbers)) != len(numbers):
        raise LessonError(f"{folder}: two lesson files have the same number.")
    return sorted(lessons, key=lambda lesson: lesson.number)


def load_all(folder: Path | None = None) -> tuple[list[Lesson], list[str]]:
    """(the lessons that check, one message per file that does not): the app shows the good ones and
    says what is wrong with the others."""
    folder = Path(folder or LESSONS_DIR)
    good, errors = [], []
    for path in sorted(folder.glob("*.toml")):
        try:
            lesson = parse_lesson(path.read_text(encoding="utf-8"), path)
        except Exception as err:  # noqa: BLE001 - one bad file must not hide the others (LessonError says why)
            errors.append(str(err) if isinstance(err, LessonError) else f"{path.name}: cannot be read: {err}")
            continue
        if any(other.number == lesson.number for other in good):
            errors.append(f"{path.name}: lesson {lesson.number} is already taken by another file.")
            continue
        good.append(lesson)
    return sorted(good, key=lambda lesson: lesson.number), errors


def main(argv: list[str] | None = None) -> int:
    """`python -m core.lessons [FILE …]`: check lesson files (default: every file in assets/lessons)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    failed = 0
    targets = [Path(a) for a in args] or sorted(LESSONS_DIR.glob("*.toml"))
    for path in targets:
        try:
            lesson = parse_lesson(path.read_text(encoding="utf-8"), path)
        except (LessonError, OSError, UnicodeDecodeError) as err:
            print(f"ERROR {err}")
            failed += 1
            continue
        asked = sum(step.check is not None for step in lesson.steps)
        print(f"ok    {path.name}: lesson {lesson.number}, {lesson.title!r}, {len(lesson.steps)} steps, {asked} questions")
    return 1 if failed else 0


def parse_position(text: str | None) -> tuple[int, int] | None:
    """'2.4' -> (2, 4): a lesson and a step, as a student shares them; None if not that shape."""
    try:
        a, b = str(text).split(".")
        return int(a), int(b)
    except (ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Questions, graded from the app's own computation
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What a grader reads: the model the student has loaded and the step's prompt or task."""

    model: Any  # HookedTransformer
    tokens: torch.Tensor | None = None  # [1, pos] the view's prompt
    task: Any = None  # tasks.Task when the view is a task
    store: Any = None  # store.ActivationStore shared with the pages
    sae: Any = None  # saes.LoadedSAE when the view names one
    models: dict | None = None  # name -> model, for questions across models
    example: int = 0  # on a task: the prompt whose tokens label the page's positions
    whole_task: bool = True  # on a task: attribution over every prompt (False: `example` only, as the page's default)

    def run(self, tokens: torch.Tensor):
        from core import store as store_module

        self.store = self.store or store_module.ActivationStore()
        return self.store.get(self.model, tokens)


@dataclass(frozen=True)
class Expected:
    """The right answer: `value` is one of `options` (or a number), `detail` says how it was measured."""

    kind: str  # "choice" (value in options) or "number" (within tolerance)
    value: Any
    options: tuple = ()
    detail: str = ""
    tolerance: float = 0.0

    also: tuple = ()  # other answers as right as `value` (a tie)

    def grade(self, answer: Any) -> bool:
        if answer in self.also:
            return True
        if self.kind == "number":
            try:
                return math.isfinite(float(answer)) and abs(float(answer) - float(self.value)) <= self.tolerance + 1e-9
            except (TypeError, ValueError):
                return False
        return answer == self.value


@dataclass(frozen=True)
class Grader:
    fn: Callable[..., Expected]
    params: dict = field(default_factory=dict)  # name -> the allowed values (a tuple) or type
    needs_task: bool = False
    needs_sae: bool = False
    what: str = ""  # what is right, for the docs and the Lessons page


def _head_options(model) -> tuple[str, ...]:
    return tuple(f"L{l}H{h}" for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads))


def _scores(model) -> dict:
    from core import attention

    seq_len = min(attention.DEFAULT_SEQ_LEN, (model.cfg.n_ctx - 1) // 2)
    tokens = attention.repeated_random_tokens(model, seq_len, attention.DEFAULT_BATCH, seed=0)
    return attention.head_scores(model, tokens), tokens, seq_len


def _top_head(kind: str, label: str) -> Callable[[Context], Expected]:
    def grade(ctx: Context) -> Expected:
        from core import attention

        scores = _scores(ctx.model)[0][kind]
        layer, head = attention.strongest_head(scores)
        return Expected("choice", f"L{layer}H{head}", _head_options(ctx.model),
                        f"L{layer}H{head} has the highest {label} score on repeated random tokens: "
                        f"{float(scores[layer, head]):.2f}.")

    return grade


def lens_labels(model) -> tuple[str, ...]:
    """The logit lens's rows as the Logit attribution page names them: "pre 0" (layer 0's input,
    the embeddings), …, "final" (the model's output)."""
    return tuple(f"pre {l}" for l in range(model.cfg.n_layers)) + ("final",)


def norm_labels(model) -> tuple[str, ...]:
    """The residual-norm heatmap's rows as the Attention page names them."""
    n = model.cfg.n_layers
    return tuple(f"resid_pre {l}" for l in range(n)) + (f"resid_post {n - 1}",)


def logit_lens_first_layer(ctx: Context) -> Expected:
    """The first residual stream (layer input, or the output) whose logit lens ranks the model's
    final top prediction first, at the last position."""
    from core import attribution, store

    run = ctx.run(ctx.tokens)
    lens = attribution.logit_lens(ctx.model, run.cache, k=1)
    final = int(lens.top_ids[-1, -1, 0])
    tops = [int(lens.top_ids[i, -1, 0]) == final for i in range(len(lens.labels))]
    first = next(i for i in range(len(tops)) if all(tops[i:]))  # ranked first from this row on, to the end
    labels = lens_labels(ctx.model)
    return Expected("choice", labels[first], labels,
                    f"The model's top prediction is {store.decode(ctx.model, final)!r}; the logit lens ranks it "
                    f"first from row {labels[first]!r} on (at the last position).")


def largest_norm_layer(ctx: Context) -> Expected:
    from core import attention

    run = ctx.run(ctx.tokens)
    norms = attention.residual_norms(run.cache, ctx.model.cfg.n_layers)[:, -1]
    labels = norm_labels(ctx.model)
    i = int(norms.argmax())
    return Expected("choice", labels[i], labels, f"At the last position the norm is largest at {labels[i]}: "
                    f"{float(norms[i]):.1f} (against {float(norms[0]):.1f} at the embeddings).")


def token_count(ctx: Context) -> Expected:
    n = int(ctx.tokens.shape[-1])
    return Expected("number", n, detail=f"The model reads {n} tokens, the BOS token included.", tolerance=0)


def _answer_wrong(ctx: Context):
    """The task's answers and wrong tokens (batch), or the model's top two next tokens on the prompt."""
    if ctx.task is not None and not ctx.whole_task:  # the Logit attribution page on "This example"
        i = ctx.example
        return ctx.task.clean_tokens[i : i + 1], ctx.task.answers[i : i + 1], ctx.task.wrongs[i : i + 1]
    if ctx.task is not None:
        return ctx.task.clean_tokens, ctx.task.answers, ctx.task.wrongs
    logits = ctx.run(ctx.tokens).logits[0, -1]
    top2 = logits.topk(2).indices
    return ctx.tokens, top2[:1], top2[1:]


def top_dla_component(ctx: Context) -> Expected:
    """The component (embeddings, a layer's attention or MLP) writing the most of the target."""
    from core import attribution

    tokens, answers, wrongs = _answer_wrong(ctx)
    from core.plots import _component_name  # the page's names: "L0 attn", "L1 mlp"

    att = attribution.by_component(ctx.model, ctx.run(tokens).cache, answers, wrongs)
    mean = att.mean()
    i = int(mean.argmax())
    names = tuple(_component_name(label) for label in att.labels)
    return Expected("choice", names[i], names,
                    f"{names[i]} writes {float(mean[i]):+.3f} of the answer − wrong logit difference directly.")


def top_dla_head(ctx: Context) -> Expected:
    from core import attribution

    tokens, answers, wrongs = _answer_wrong(ctx)
    att = attribution.by_head(ctx.model, ctx.run(tokens).cache, answers, wrongs)
    grid = attribution.head_grid(ctx.model, att)
    layer, head = divmod(int(grid.argmax()), grid.shape[1])
    return Expected("choice", f"L{layer}H{head}", _head_options(ctx.model),
                    f"L{layer}H{head} writes {float(grid[layer, head]):+.3f} of the logit difference directly, "
                    "more than any other head.")


def logit_difference(ctx: Context) -> Expected:
    """The target the attributions add up to (answer − wrong logit, mean over the task)."""
    from core import attribution

    tokens, answers, wrongs = _answer_wrong(ctx)
    value = float(attribution.target(ctx.model, ctx.run(tokens).logits, answers, wrongs).mean())
    return Expected("number", round(value, 2), detail=f"The logit difference is {value:+.4f}; the direct "
                    "contributions plus the bias add up to it.", tolerance=0.01)


def _sweep(ctx: Context, what: str, direction: str = "denoise"):
    from core import patching

    return patching.sweep_task(ctx.model, ctx.task, what, direction, activation_store=ctx.store)


def top_patching_head(ctx: Context, direction: str = "denoise") -> Expected:
    result = _sweep(ctx, "z", direction)
    grid = result.values
    effect = grid - result.baseline  # denoising: 0 = the corrupted run; noising: 1 = the clean run
    best = effect.argmax() if direction == "denoise" else effect.abs().argmax()  # restores most / changes most
    layer, head = divmod(int(best), grid.shape[1])
    what = "restores" if direction == "denoise" else "destroys"
    share = float(grid[layer, head]) if direction == "denoise" else 1 - float(grid[layer, head])
    return Expected("choice", f"L{layer}H{head}", _head_options(ctx.model),
                    f"Patching L{layer}H{head}'s output {what} {share:.0%} of the clean − corrupted difference "
                    f"({'denoising' if direction == 'denoise' else 'noising'}; the largest effect of any head).")


def top_resid_position(ctx: Context) -> Expected:
    """The token position whose residual stream (at layer 0's input) restores the most when patched."""
    from core import store

    result = _sweep(ctx, "resid_pre")
    first = result.values[0]  # [pos] at layer 0's input
    pos = int(first.argmax())
    clean = store.str_tokens(ctx.model, ctx.task.clean_tokens[ctx.example])  # the page's position labels
    labels = tuple(f"{p}: {t}" for p, t in enumerate(clean))
    return Expected("choice", labels[pos], labels,
                    f"Patching the residual stream at position {labels[pos]!r} (layer 0) restores "
                    f"{float(first[pos]):.0%} of the difference: that is where clean and corrupted prompts differ.")


def clean_metric(ctx: Context) -> Expected:
    from core import tasks

    norm = tasks.normaliser(ctx.task, ctx.run(ctx.task.clean_tokens).logits, ctx.run(ctx.task.corrupted_tokens).logits)
    return Expected("number", round(norm.clean, 2), detail=f"Mean {ctx.task.metric_label} on the clean prompts: "
                    f"{norm.clean:+.4f} (corrupted: {norm.corrupted:+.4f}).", tolerance=0.01)


def task_solved(ctx: Context) -> Expected:
    from core import tasks

    clean = ctx.run(ctx.task.clean_tokens).logits
    corrupted = ctx.run(ctx.task.corrupted_tokens).logits
    ok = tasks.solves(ctx.task, clean, corrupted)
    metric = ctx.task.metric(clean)
    right = float((metric > 0).float().mean())
    return Expected("choice", "Yes" if ok else "No", ("Yes", "No"),
                    f"The answer beats the wrong token on {right:.0%} of the prompts; the app counts a task as solved "
                    f"at ≥ {tasks.MIN_DEMO_ACCURACY:.0%} with a clear clean − corrupted gap.")


def top_ablation_head(ctx: Context) -> Expected:
    from core import patching

    result, norm = patching.ablate_task(ctx.model, ctx.task, "heads", "mean", activation_store=ctx.store)
    drop = (result.clean_metric - result.metric).reshape(ctx.model.cfg.n_layers, -1)  # [layer, head] metric lost
    layer, head = divmod(int(drop.argmax()), drop.shape[1])
    return Expected("choice", f"L{layer}H{head}", _head_options(ctx.model),
                    f"Mean-ablating L{layer}H{head} lowers the metric by {float(drop[layer, head]):.3f}, more than "
                    "any other head.")


def composition_input(ctx: Context) -> Expected:
    """The input (Q, K or V) of the strongest induction head through which the previous-token heads
    matter most: ablating them there lowers its induction score most."""
    from core import attention

    scores, tokens, seq_len = _scores(ctx.model)
    target = attention.strongest_head(scores["induction"])
    sources = attention.previous_token_heads(scores["previous_token"], before_layer=target[0])
    if not sources:
        sources = [attention.strongest_head(scores["previous_token"][: max(target[0], 1)])]
    table = attention.composition_table(ctx.model, tokens, seq_len, sources, target)
    base = table[0].target_score
    drops = {r.on.upper(): base - r.target_score for r in table[1:]}
    best = max(drops, key=drops.get)
    return Expected("choice", best, ("Q", "K", "V"),
                    f"Removing {', '.join(f'L{l}H{h}' for l, h in sources)} from L{target[0]}H{target[1]}'s "
                    + ", ".join(f"{k} lowers its induction score by {v:.2f}" for k, v in drops.items()) + ".")


def composition_loss(ctx: Context) -> Expected:
    """Does removing the previous-token heads from the induction heads' keys raise the loss on the
    repeated half?"""
    from core import attention

    scores, tokens, seq_len = _scores(ctx.model)
    target = attention.strongest_head(scores["induction"])
    sources = attention.previous_token_heads(scores["previous_token"], before_layer=target[0])
    also = [h for h in attention.induction_heads(scores["induction"], target[0]) if h != target[1]]
    table = attention.composition_table(ctx.model, tokens, seq_len, sources, target, also)
    base, k = table[0].loss, next(r for r in table if r.on == "k").loss
    change = "It rises" if k > base + 0.05 else "It falls" if k < base - 0.05 else "It barely changes"
    return Expected("choice", change, ("It rises", "It falls", "It barely changes"),
                    f"Loss on the repeated half: {base:.3f} nats intact, {k:.3f} with the previous-token heads "
                    "removed from the induction heads' keys (a change of less than 0.05 counts as barely).")


def strongest_induction_model(ctx: Context) -> Expected:
    from core import attention

    rows = {name: attention.induction_strength(model) for name, model in (ctx.models or {}).items()}
    if not rows:
        rows = {ctx.model.cfg.model_name: attention.induction_strength(ctx.model)}
    best = max(rows, key=lambda n: rows[n]["score"])
    return Expected("choice", best, tuple(rows),
                    f"{best}'s {rows[best]['head']} scores {rows[best]['score']:.2f}, the strongest induction head of "
                    f"the {len(rows)} models.")


def top_feature(ctx: Context, position: int = -1) -> Expected:
    """The SAE feature with the highest activation at `position` of the prompt."""
    from core import saes

    acts = saes.prompt_features(ctx.model, ctx.sae, ctx.run(ctx.tokens).cache)[position]  # [d_sae]
    f = int(acts.argmax())
    return Expected("number", f, detail=f"Feature {f} has the highest activation at that position: "
                    f"{float(acts[f]):.3f}.", tolerance=0)


def steering_flips(ctx: Context) -> Expected:
    from core import steering

    check = steering.default_demo_check(ctx.model, ctx.store)
    if check.flip is None:
        return Expected("choice", "No", ("Yes", "No"), check.reason)
    return Expected("choice", "Yes" if check.flip.steered > check.flip.unsteered else "No", ("Yes", "No"),
                    check.reason)


def best_probe_layer(ctx: Context) -> Expected:
    """The layer whose residual stream a linear probe separates plural from singular subjects best
    (test accuracy, the Steering page's default probes)."""
    from core import steering

    result = steering.probes_with_control(ctx.model, "sva")[0]
    acc = result.test_accuracy
    labels = tuple(result.layers)
    acc = torch.as_tensor(acc, dtype=torch.float64)
    i = int(acc.argmax())
    ties = tuple(label for label, a in zip(labels, acc.tolist()) if a >= float(acc[i]) - 1e-9)
    return Expected("choice", labels[i], labels, f"The probe at {', '.join(ties)} reaches {float(acc[i]):.0%} test "
                    "accuracy, the best of the layers.", also=ties)


GRADERS: dict[str, Grader] = {
    "token_count": Grader(token_count, what="the number of tokens of the prompt, BOS included"),
    "top_previous_token_head": Grader(_top_head("previous_token", "previous-token"),
                                      what="the head with the top previous-token score (repeated random tokens)"),
    "top_induction_head": Grader(_top_head("induction", "induction"),
                                 what="the head with the top induction score (repeated random tokens)"),
    "largest_norm_layer": Grader(largest_norm_layer, what="where the residual stream's norm is largest at the last position"),
    "logit_lens_first_layer": Grader(logit_lens_first_layer,
                                     what="the first logit-lens row that ranks the model's final prediction first"),
    "top_dla_component": Grader(top_dla_component, what="the component with the largest direct logit attribution"),
    "top_dla_head": Grader(top_dla_head, what="the head with the largest direct logit attribution"),
    "logit_difference": Grader(logit_difference, what="the logit difference the attributions add up to (± 0.01)"),
    "clean_metric": Grader(clean_metric, needs_task=True, what="the task's mean metric on the clean prompts (± 0.01)"),
    "top_resid_position": Grader(top_resid_position, needs_task=True,
                                 what="the position whose residual stream at layer 0 restores most when patched"),
    "top_patching_head": Grader(top_patching_head, {"direction": ("denoise", "noise")}, needs_task=True,
                                what="the head whose patched output moves the metric most (denoise or noise)"),
    "top_ablation_head": Grader(top_ablation_head, needs_task=True, what="the head whose mean ablation costs most"),
    "task_solved": Grader(task_solved, needs_task=True, what="whether the model solves the task (Yes/No)"),
    "composition_input": Grader(composition_input,
                                what="Q, K or V: the induction head's input through which previous-token heads matter"),
    "composition_loss": Grader(composition_loss,
                               what="how the repeated-half loss moves without the induction heads' K-composition"),
    "strongest_induction_model": Grader(strongest_induction_model,
                                        what="the model (zoo and loaded) with the strongest induction head"),
    "top_feature": Grader(top_feature, {"position": int}, needs_sae=True,
                          what="the SAE feature most active at a position (default: the last)"),
    "steering_flips": Grader(steering_flips, what="whether the default plural direction flips agreement (Yes/No)"),
    "best_probe_layer": Grader(best_probe_layer, what="the layer where the plural/singular probe scores best"),
}


def expected(check: Check, ctx: Context) -> Expected:
    """The right answer to `check` on the context's model (computed, never read from the lesson)."""
    grader = GRADERS[check.answer]
    return grader.fn(ctx, **check.params)


if __name__ == "__main__":
    raise SystemExit(main())
