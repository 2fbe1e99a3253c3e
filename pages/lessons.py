"""Lessons page: the guided lessons (assets/lessons/*.toml), progress, and a checker for new lesson files."""
import streamlit as st

from core import lessons
from core.ui import lessons as lesson_ui
from core.ui import state as ui

ui.page_view()  # the frame's sidebar; the lessons load their own models, step by step

st.markdown(
    "Each lesson is a series of steps. A step opens a page of the app **in the right state** (model, prompt or "
    "task, layer, head, view) and explains what to look at, in the sidebar; many ask a question the app grades "
    "**from its own computation on the model you have loaded** (\"which head is the induction head?\" is right "
    "when it is the head with the top induction score). Your progress is kept while this browser tab is open, and "
    "the step is in the link: share `?lesson=2.4` and a student opens step 4 of lesson 2."
)

found, errors = lesson_ui.all_lessons()
for error in errors:
    st.error(ui.md_escape(f"A lesson file could not be used: {error}"))
progress = lesson_ui.progress()

for lesson in found:
    entry = progress.get(lesson.number, {"step": 0, "right": []})
    asked = [i for i, s in enumerate(lesson.steps, 1) if s.check is not None]
    with st.container(border=True, key=f"lesson_card_{lesson.number}"):
        left, right = st.columns([4, 1])
        left.subheader(f"{lesson.number}. {lesson.title}")
        left.caption(f"About {lesson.minutes} minutes · {len(lesson.steps)} steps · {len(asked)} questions")
        left.markdown(lesson.summary)
        reached = entry["step"]
        right.button(f"Continue at {lesson.number}.{reached}" if reached else "Start", key=f"start_{lesson.number}",
                     type="primary", width="stretch", on_click=lesson_ui.go, args=(lesson, max(reached, 1)))
        if reached:
            right.progress(len(entry["right"]) / max(len(asked), 1),
                           text=f"{len(entry['right'])}/{len(asked)} right")
        with st.expander("Steps"):
            for i, step in enumerate(lesson.steps, 1):
                mark = "✅" if i in entry["right"] else ("❓" if step.check is not None else "·")
                c1, c2 = st.columns([5, 1])
                c1.markdown(f"{mark} **{lesson.number}.{i}** {step.title} — *{lesson_ui.page_label(step)}*")
                c2.button("Open", key=f"open_{lesson.number}_{i}", type="tertiary", on_click=lesson_ui.go,
                          args=(lesson, i))

st.subheader("Write a lesson")
st.markdown(
    "A lesson is a TOML file in `assets/lessons/` named `NN-slug.toml`: a `[lesson]` table (title, minutes, summary) "
    "and `[[steps]]`, each with a `title`, a Markdown `text`, a `view` (the page and its state) and an optional "
    "`check` (a question and the name of the computation that grades it). The format, every view setting and every "
    "check are in `docs/lessons.md`. Everything a file names is checked when it loads: drop a file here to check it."
)
upload = st.file_uploader("Check a lesson file", type=["toml"], key="lesson_upload")
if upload is not None:
    from pathlib import Path

    try:
        lesson = lessons.parse_lesson(upload.getvalue().decode("utf-8"), Path(upload.name))
    except Exception as err:  # noqa: BLE001 - LessonError says why; anything else is still the file's fault
        st.error(ui.md_escape(str(err) if isinstance(err, lessons.LessonError) else f"{upload.name}: {err}"))
    else:
        st.success(ui.md_escape(f"{upload.name}: lesson {lesson.number}, {lesson.title!r}, {len(lesson.steps)} steps, "
                                f"{sum(s.check is not None for s in lesson.steps)} questions. Every step checks."))
with st.expander("The checks a question can use"):
    st.table([{"check": name, "params": ", ".join(g.params) or "—",
               "needs": ", ".join(w for w, f in (("a task", g.needs_task), ("an SAE", g.needs_sae)) if f) or "—",
               "what is right": g.what}
              for name, g in lessons.GRADERS.items()])

ui.sidebar_footer()
