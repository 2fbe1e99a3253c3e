"""The built-in tasks as the sidebar lists them: names, labels and sentence templates.

Light on purpose (no torch, no TransformerLens): the app frame draws its sidebar from it before
the heavy libraries have loaded. `core.tasks` builds the tasks themselves.
"""
from __future__ import annotations

from core import corpus

LABELS = {
    "ioi": "IOI (indirect object)",
    "greater_than": "Greater-than (years)",
    "sva": "Subject-verb agreement",
    "induction": "Induction (repeated tokens)",
}
BATCH = 32  # prompts per built-in task


def templates(name: str) -> list[corpus.Template]:
    """The corpus templates of a built-in text task (IOI, greater-than, agreement); [] for others."""
    return {"ioi": corpus.IOI_TEMPLATES, "greater_than": corpus.GT_TEMPLATES, "sva": corpus.SVA_TEMPLATES}.get(name, [])


def default_template(name: str) -> str | None:
    """The template a task opens on: a trained one, where the zoo models show the behaviour the
    pages teach (held-out templates stay selectable, labelled as such)."""
    tpls = templates(name)
    trained = [t for t in tpls if not t.held_out]
    return (trained or tpls)[0].name if tpls else None
