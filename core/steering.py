"""Directions in the residual stream: build them, steer with them, watch them, probe for them.

A `Direction` is a vector [d_model] read and written at one hook (`blocks.L.hook_resid_pre`).
- **Build**: the mean difference of two prompt sets' residual streams at a layer and position
  (`contrastive_direction`), an SAE feature's decoder row (`sae_direction`), or a trained probe's
  weight (`probe_direction`).
- **Steer**: add alpha · direction at the hook (every position, or from a position on), or project
  the direction out (directional ablation); `generate` runs with and without from the same seed.
- **Monitor**: `monitored_generate` measures the projection of the residual stream on each
  watched direction at every new token, and from the token where it crosses a threshold on,
  applies the chosen intervention (in the same forward pass, before the next layer).
- **Probe**: logistic-regression probes per layer on cached activations (`train_probes`).

Directions are saved as safetensors (the vector) plus a small JSON (where it came from).
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, utils

from core import store
from core.paths import data_dir

MAX_ALPHA = 100.0  # |alpha| above this many direction norms is refused
MIN_PROBE_PROMPTS = 8  # per class
MAX_NAME_CHARS = 64
# A direction's name is also its file name: letters, digits, spaces, '-', '_' and '.', starting with a
# letter, digit, '_' or '-' (no leading dot: '..' or '.x' would be a hidden file or a path step) and not
# ending in a space.
NAME_RE = re.compile(r"[A-Za-z0-9_-](?:[A-Za-z0-9 _.-]{0,%d}[A-Za-z0-9_.-])?\Z" % (MAX_NAME_CHARS - 2))
NAME_RULE = (f"A direction's name is 1–{MAX_NAME_CHARS} characters: letters (A–Z, a–z), digits, spaces, '-', '_' "
             "and '.'; it starts with a letter, a digit, '_' or '-' (not a dot or a space) and does not end in a space.")


class SteeringError(ValueError):
    """Bad input for steering (alpha, direction size, prompts); the message is for the user."""


@dataclass
class Direction:
    name: str
    hook_name: str  # blocks.L.hook_resid_pre
    vector: torch.Tensor  # [d_model]
    source: str  # "contrast", "sae", "probe" or "file"
    info: dict = field(default_factory=dict)

    @property
    def layer(self) -> int:
        return int(self.hook_name.split(".")[1])

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm().clamp_min(1e-12)


def check_direction(model: HookedTransformer, direction: Direction) -> None:
    made_on = direction.info.get("model")
    if made_on and made_on != model.cfg.model_name:
        raise SteeringError(f"Direction '{direction.name}' was made on {made_on}, not on {model.cfg.model_name}: "
                            "its numbers mean nothing here, even where the widths agree.")
    if direction.vector.ndim != 1 or direction.vector.shape[0] != model.cfg.d_model:
        raise SteeringError(
            f"Direction '{direction.name}' has {tuple(direction.vector.shape)} numbers; {model.cfg.model_name}'s "
            f"residual stream has d_model = {model.cfg.d_model}. It was made for another model."
        )
    if direction.hook_name not in model.hook_dict:
        raise SteeringError(f"Direction '{direction.name}' reads '{direction.hook_name}', which this model does not have.")
    if not torch.isfinite(direction.vector).all() or float(direction.vector.norm()) == 0.0:
        raise SteeringError(f"Direction '{direction.name}' is zero or not finite.")


def check_name(name: str) -> str:
    """`name` if it is a safe direction name (it becomes a file name), else a SteeringError saying why."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SteeringError(f"{name!r} cannot be a direction's name. {NAME_RULE}")
    return name


def check_alpha(alpha: float) -> None:
    if not (-MAX_ALPHA <= float(alpha) <= MAX_ALPHA):
        raise SteeringError(f"alpha = {alpha:g} is out of the sane range [-{MAX_ALPHA:g}, {MAX_ALPHA:g}] (in direction norms).")


# ---------------------------------------------------------------------------------------------
# Building directions
# ---------------------------------------------------------------------------------------------


def _prompt_tokens(model: HookedTransformer, prompts: list[str]) -> list[torch.Tensor]:
    out = []
    for p in prompts:
        if p.strip():
            out.append(store.to_tokens(model, p)[0, : model.cfg.n_ctx])
    return out


def residuals(model: HookedTransformer, prompts: list[str], layer: int, position: int | None) -> torch.Tensor:
    """[n, d_model]: each prompt's residual stream at `blocks.{layer}.hook_resid_pre`, at `position` (None = last token)."""
    name = utils.get_act_name("resid_pre", layer)
    out = []
    for tokens in _prompt_tokens(model, prompts):
        pos = len(tokens) - 1 if position is None else position
        if not 0 <= pos < len(tokens):
            raise SteeringError(f"Position {position} does not exist in a prompt of {len(tokens)} tokens "
                                f"(BOS is position 0): {store.decode(model, tokens[1:])!r}.")
        _, cache = store.run_with_cache(model, tokens[None], names_filter=name)
        out.append(cache[name][0, pos])
    return torch.stack(out) if out else torch.zeros(0, model.cfg.d_model)


def contrastive_direction(model: HookedTransformer, positive: list[str], negative: list[str], layer: int,
                          position: int | None = None, name: str = "contrast") -> Direction:
    """mean(resid | positive prompts) − mean(resid | negative prompts) at a layer and position."""
    pos, neg = residuals(model, positive, layer, position), residuals(model, negative, layer, position)
    if len(pos) == 0 or len(neg) == 0:
        raise SteeringError("Give at least one prompt on each side (one prompt per line).")
    vector = pos.mean(0) - neg.mean(0)
    unit = vector / vector.norm().clamp_min(1e-12)
    hi, lo = float(pos.mean(0) @ unit), float(neg.mean(0) @ unit)
    return Direction(name, utils.get_act_name("resid_pre", layer), vector.detach().clone(), "contrast",
                     {"model": model.cfg.model_name, "positive": len(pos), "negative": len(neg),
                      "position": "last" if position is None else position,
                      "positive_projection": hi, "negative_projection": lo,
                      # A monitor threshold three quarters of the way from the negative side's mean
                      # projection to the positive side's: other tokens rarely reach it.
                      "threshold": lo + 0.75 * (hi - lo)})


def sae_direction(loaded, feature: int, name: str | None = None, model_name: str | None = None) -> Direction:
    """An SAE feature's decoder direction, for residual-stream SAEs (`blocks.L.hook_resid_pre`/`post`)."""
    hook = loaded.hook_name
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook)
    if m is None:
        raise SteeringError(f"Only residual-stream SAEs give a steering direction; this one reads '{hook}'.")
    layer = int(m.group(1)) + (1 if m.group(2) == "post" else 0)
    vector = loaded.sae.W_dec[int(feature)].detach().clone().float()
    return Direction(name or f"sae-{feature}", utils.get_act_name("resid_pre", layer), vector, "sae",
                     {"model": model_name, "sae": loaded.sae_id, "feature": int(feature)})


# ---------------------------------------------------------------------------------------------
# The default demonstration: a plural direction flips " is" to " are"
# ---------------------------------------------------------------------------------------------

# The default contrast: plural against singular subjects, read at the subject (position 2: BOS,
# "The", the noun) one layer in.
PLURAL_PROMPTS = ["The keys on the table", "The books near the door", "The dogs behind the house", "The cars by the road",
                  "The cups on the chair", "The boxes near the window", "The trees by the river", "The cats under the table"]
SINGULAR_PROMPTS = ["The key on the table", "The book near the door", "The dog behind the house", "The car by the road",
                    "The cup on the chair", "The box near the window", "The tree by the river", "The cat under the table"]
DEFAULT_POSITION = 2
# The embedded model the README's demonstrations are measured on (tests check that it passes
# `default_demo_check`); the page offers to switch to it where the check fails.
DEMO_MODEL = "ce-circuits-3l-mlp"
DEMO_ALPHA = 1.0
DEMO_MIN_FLIP = 0.5  # steering must raise the share of prompts where " are" beats " is" by this much


def demo_model_available() -> bool:
    """Whether `DEMO_MODEL` is among the embedded models (a trimmed install may lack it)."""
    from core.models import zoo_models

    return DEMO_MODEL in zoo_models()


def default_layer(model: HookedTransformer) -> int:
    return min(1, model.cfg.n_layers - 1)


def default_direction(model: HookedTransformer, name: str = "plural") -> Direction:
    """The default contrast direction: plural minus singular subjects at the noun, `default_layer` in."""
    return contrastive_direction(model, PLURAL_PROMPTS, SINGULAR_PROMPTS, default_layer(model), DEFAULT_POSITION, name=name)


@dataclass
class AgreementPrompts:
    tokens: torch.Tensor  # [n, pos] held-out agreement prompts whose subject is singular
    is_: int  # token ids of " is" and " are" (the task's own)
    are: int
    template: str


@dataclass
class AgreementFlip:
    n: int  # prompts
    unsteered: float  # share of them where " are" beats " is" without the hooks
    steered: float  # and with them
    template: str


def agreement_prompts(model: HookedTransformer, n: int = 64, seed: int = 5) -> AgreementPrompts:
    """The held-out agreement prompts with a singular subject (half of `tasks.sva`'s n)."""
    from core import tasks

    try:
        t = tasks.sva(model, n=n, seed=seed, split="held_out")
    except tasks.TaskError as err:
        raise SteeringError(f"The agreement prompts cannot be built for this model: {err}") from err
    return AgreementPrompts(t.clean_tokens[1::2], int(t.wrongs[0]), int(t.answers[0]), t.template)


@torch.inference_mode()
def agreement_flip(model: HookedTransformer, hooks, prompts: AgreementPrompts | None = None,
                   base_logits: torch.Tensor | None = None) -> AgreementFlip:
    """How often " are" beats " is" on singular-subject agreement prompts, without and with `hooks`.

    `base_logits` [n, pos, d_vocab]: the unsteered run's logits when the caller has them.
    """
    prompts = prompts or agreement_prompts(model)
    base = (store.run(model, prompts.tokens) if base_logits is None else base_logits)[:, -1]
    steered = store.run_with_hooks(model, prompts.tokens, hooks)[:, -1]
    share = lambda lg: float((lg[:, prompts.are] > lg[:, prompts.is_]).float().mean())  # noqa: E731
    return AgreementFlip(len(prompts.tokens), share(base), share(steered), prompts.template)


@dataclass
class DemoCheck:
    works: bool
    reason: str  # for the person: what was measured
    flip: AgreementFlip | None = None


def default_demo_check(model: HookedTransformer, activation_store=None) -> DemoCheck:
    """Does the page's default demonstration work on this model? Measured, not looked up by name:
    add `DEMO_ALPHA` × the default plural direction and count the held-out singular-subject agreement
    prompts on which " are" beats " is". It works when steering raises that share by `DEMO_MIN_FLIP`.
    `activation_store`: where the unsteered run is read from (and kept for the page), if given."""
    name = model.cfg.model_name
    try:
        direction = default_direction(model)
        hooks = steering_hooks(model, direction, "add", DEMO_ALPHA)
        prompts = agreement_prompts(model)
        base = None if activation_store is None else activation_store.get(model, prompts.tokens).logits
        flip = agreement_flip(model, hooks, prompts, base_logits=base)
    except SteeringError as err:
        return DemoCheck(False, f"{err} So the default plural direction has nothing to act on in {name}.")
    gain = flip.steered - flip.unsteered
    said = (f"adding the default plural direction (α = {DEMO_ALPHA:g}) makes ' are' beat ' is' on {flip.steered:.0%} of "
            f"{flip.n} held-out agreement prompts with a singular subject, against {flip.unsteered:.0%} without")
    if gain >= DEMO_MIN_FLIP:
        return DemoCheck(True, f"On {name}, {said}.", flip)
    return DemoCheck(False, f"On {name}, {said}: this model does not use that direction for agreement.", flip)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def directions_dir() -> Path:
    """Where saved directions go: `directions/` in the app's data folder."""
    return data_dir() / "directions"


def save_direction(direction: Direction, folder: Path | None = None) -> Path:
    """Write `<name>.safetensors` (the vector) and `<name>.json` (where it came from) into `folder`.

    Each file is written to a temporary file in the same folder and renamed over the real name
    only when both are complete, so a failed save (a full disk) leaves no half-written file and
    keeps an earlier direction of the same name as it was; the temporary files are removed.
    """
    from safetensors.torch import save_file

    check_name(direction.name)
    folder = Path(folder or directions_dir())
    meta = {"name": direction.name, "hook_name": direction.hook_name, "source": direction.source, "info": direction.info,
            "d_model": int(direction.vector.shape[0])}
    targets = {"safetensors": folder / f"{direction.name}.safetensors", "json": folder / f"{direction.name}.json"}
    temps: dict[str, Path] = {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for kind in targets:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{direction.name}.", suffix=".tmp")
            os.close(fd)
            temps[kind] = Path(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; saved directions are ordinary files
        save_file({"vector": direction.vector.detach().contiguous()}, str(temps["safetensors"]))
        temps["json"].write_text(json.dumps(meta, indent=2))
        for kind, target in targets.items():
            os.replace(temps.pop(kind), target)
    except Exception as err:  # OSError, or safetensors' SafetensorError wrapping one
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        text = f"{type(err).__name__}: {err}"
        full = getattr(err, "errno", None) == errno.ENOSPC or "no space left" in text.lower()
        raise SteeringError(
            (f"Could not save direction '{direction.name}': the disk is full (no space left in {folder}). "
             "Nothing was written; free some space and save again."
             if full else f"Could not save direction '{direction.name}' in {folder}: {text}. Nothing was written.")
        ) from err
    return targets["safetensors"]


def list_directions(folder: Path | None = None) -> list[str]:
    """Names of the saved directions in `folder` (both files there, and a valid name)."""
    folder = Path(folder or directions_dir())
    if not folder.exists():
        return []
    return sorted(p.stem for p in folder.glob("*.json")
                  if NAME_RE.fullmatch(p.stem) and (folder / f"{p.stem}.safetensors").exists())


def load_direction(name: str, folder: Path | None = None) -> Direction:
    from safetensors.torch import load_file

    check_name(name)
    folder = Path(folder or directions_dir())
    try:
        meta = json.loads((folder / f"{name}.json").read_text())
        vector = load_file(str(folder / f"{name}.safetensors"))["vector"].float()
        info = meta.get("info", {})
        if not (isinstance(meta["name"], str) and isinstance(meta["hook_name"], str) and isinstance(info, dict)):
            raise TypeError("name and hook_name must be strings, info an object")
        return Direction(meta["name"], meta["hook_name"], vector, str(meta.get("source", "file")), info)
    except Exception as err:
        raise SteeringError(f"Could not read direction '{name}' (missing or corrupt file): {type(err).__name__}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Steering
# ---------------------------------------------------------------------------------------------


def add_hook(direction: Direction, alpha: float, from_pos: int = 0):
    """resid[:, from_pos:] += alpha · direction (the raw vector, not normalised)."""
    vec = direction.vector

    def hook(act, hook):
        act = act.clone()
        act[:, from_pos:] += alpha * vec.to(act.dtype)
        return act

    return hook


def ablate_hook(direction: Direction, from_pos: int = 0):
    """Project the direction out of resid[:, from_pos:]: x − (x · û) û."""
    u = direction.unit

    def hook(act, hook):
        act = act.clone()
        part = act[:, from_pos:]
        act[:, from_pos:] = part - (part @ u.to(act.dtype))[..., None] * u.to(act.dtype)
        return act

    return hook


def steering_hooks(model: HookedTransformer, direction: Direction, mode: str, alpha: float = 0.0, from_pos: int = 0):
    """[(hook name, fn)] for mode "add" (alpha · direction) or "ablate" (project out)."""
    check_direction(model, direction)
    if mode == "add":
        check_alpha(alpha)
        return [(direction.hook_name, add_hook(direction, alpha, from_pos))]
    if mode == "ablate":
        return [(direction.hook_name, ablate_hook(direction, from_pos))]
    raise SteeringError(f"Unknown steering mode {mode!r}: 'add' or 'ablate'.")


@torch.inference_mode()
def next_token_shift(model: HookedTransformer, tokens: torch.Tensor, hooks, k: int = 10,
                     base_logits: torch.Tensor | None = None) -> dict:
    """Next-token distribution after `tokens` [1, pos] without and with hooks: top tokens and KL.

    rows: the union of the k most likely tokens unsteered and the k most likely steered (up to 2k),
    largest probability (of either run) first, so the prediction steering removed stays in view.
    `base_logits` [1, pos, d_vocab]: the unsteered run's logits when the caller has them (the
    activation store's), so the plain forward pass is not run again.
    """
    base = (store.run(model, tokens) if base_logits is None else base_logits)[0, -1]
    steered = store.run_with_hooks(model, tokens, hooks)[0, -1]
    return distribution_shift(base, steered, k)


def distribution_shift(base: torch.Tensor, changed: torch.Tensor, k: int = 10) -> dict:
    """How an intervention changed one next-token distribution: logits [d_vocab] before and after.

    rows: the union of the k most likely tokens before and the k most likely after (up to 2k), each
    with both probabilities and the logit change, largest probability (of either run) first, so a
    prediction the intervention removed stays in view; kl: KL(before ‖ after) in nats; the top
    token of each run.
    """
    base, changed = base.float(), changed.float()
    p, q = base.log_softmax(-1), changed.log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum())
    top = torch.unique(torch.cat([p.topk(k).indices, q.topk(k).indices]))
    rows = sorted(({"token": int(t), "before": float(p[t].exp()), "after": float(q[t].exp()),
                    "logit change": float(changed[t] - base[t])} for t in top.tolist()),
                  key=lambda r: (-max(r["before"], r["after"]), r["token"]))
    return {"rows": rows, "kl": kl, "top_before": int(p.argmax()), "top_after": int(q.argmax())}


@torch.inference_mode()
def generate(model: HookedTransformer, tokens: torch.Tensor, n_new: int, hooks=(), seed: int = 0,
             temperature: float = 1.0) -> torch.Tensor:
    """Sample `n_new` tokens after `tokens` [1, pos] (greedy at temperature 0), hooks on every step.

    The same seed gives the same random numbers with and without hooks, so two runs differ only
    where the hooks change the distribution.
    """
    gen = torch.Generator().manual_seed(seed)
    seq = tokens.clone()
    for _ in range(n_new):
        if seq.shape[1] >= model.cfg.n_ctx:
            break
        logits = (store.run_with_hooks(model, seq, list(hooks)) if hooks else store.run(model, seq))[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen))
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return seq


def sequence_text(model: HookedTransformer, tokens) -> str:
    """The text of a generated sequence [pos] after BOS, decoded by the tokenizer as one sequence,
    so word pieces join as its decoder joins them ('17' '##61' → '1761'), also across the prompt's end."""
    ids = [int(t) for t in tokens]
    return store.decode(model, ids[1:])


def glued_positions(model: HookedTransformer, tokens) -> list[int]:
    """Positions whose token the tokenizer's decoder writes onto the token before it with no space,
    in a sequence [pos] where it puts spaces between other tokens (WordPiece's '##' pieces:
    'jane' '##98' → 'jane98'). Empty for a decoder that never adds spaces (GPT-2's byte-level BPE,
    whose tokens carry their own spaces)."""
    ids = [int(t) for t in tokens]
    single = store.str_tokens(model, ids)
    glued, spaced = [], False
    for i in range(1, len(ids)):
        pair = store.decode(model, ids[i - 1: i + 1])
        if single[i] and pair == single[i - 1] + single[i]:
            glued.append(i)
        elif pair == single[i - 1] + " " + single[i]:
            spaced = True
    return glued if spaced else []


def token_labels(model: HookedTransformer, tokens) -> list[str]:
    """Each token's text for a per-position label, with '##' before a piece that continues the token
    before it (`glued_positions`), so 'jane' '##98' is not read as a word 'jane' and a number '98'."""
    labels = store.str_tokens(model, [int(t) for t in tokens])
    for i in glued_positions(model, tokens):
        labels[i] = "##" + labels[i]
    return labels


# ---------------------------------------------------------------------------------------------
# Glass-box monitor
# ---------------------------------------------------------------------------------------------


@dataclass
class Watch:
    direction: Direction
    threshold: float  # on the projection x · û
    action: str = "ablate"  # "ablate" (project out), "subtract" (add −alpha · û) or "none" (only mark)
    alpha: float = 0.0


@dataclass
class MonitorResult:
    tokens: torch.Tensor  # [1, pos] prompt + generated
    prompt_len: int
    projections: list[list[float]]  # [watch][every position], before any intervention at that position
    tripped_at: list[int | None]  # position where each watch first crossed its threshold


@torch.inference_mode()
def monitored_generate(model: HookedTransformer, tokens: torch.Tensor, n_new: int, watches: list[Watch], seed: int = 0,
                       temperature: float = 0.0, on_step=None) -> MonitorResult:
    """Generate while watching directions; from the first position where a watch's projection
    exceeds its threshold, apply its action at that position and every later one.

    The projection at a position is measured on the residual stream at the watch's hook before
    the watch's own intervention (earlier layers' interventions included, and those of watches
    listed before it on the same hook). BOS never trips a watch. `on_step(result)` is
    called after each token, for a live chart.
    """
    for w in watches:
        check_direction(model, w.direction)
        if w.action not in ("ablate", "subtract", "none"):
            raise SteeringError(f"Unknown monitor action {w.action!r}.")
        if w.action == "subtract":
            check_alpha(w.alpha)
    gen = torch.Generator().manual_seed(seed)
    seq = tokens.clone()
    prompt_len = tokens.shape[1]
    tripped: list[int | None] = [None] * len(watches)
    projections: list[list[float]] = [[] for _ in watches]

    def make_hook(i: int, w: Watch):
        u = w.direction.unit

        def hook(act, hook):
            uu = u.to(act.dtype)
            proj = act[0] @ uu  # [pos]
            record[i] = proj
            if tripped[i] is None:
                over = (proj[1:] > w.threshold).nonzero()  # BOS (position 0) never trips: its norm is an outlier
                if len(over):
                    tripped[i] = int(over[0]) + 1
            start = tripped[i]
            if start is None or w.action == "none":
                return act
            act = act.clone()
            part = act[:, start:]
            if w.action == "ablate":
                act[:, start:] = part - (part @ uu)[..., None] * uu
            else:
                act[:, start:] = part - w.alpha * uu
            return act

        return hook

    record: dict[int, torch.Tensor] = {}
    hooks = [(w.direction.hook_name, make_hook(i, w)) for i, w in enumerate(watches)]
    for step in range(n_new + 1):
        record.clear()
        logits = store.run_with_hooks(model, seq, hooks)[0, -1].float()
        for i in range(len(watches)):
            projections[i] = record[i].tolist()
        result = MonitorResult(seq, prompt_len, [list(p) for p in projections], list(tripped))
        if on_step is not None:
            on_step(result)
        if step == n_new or seq.shape[1] >= model.cfg.n_ctx:
            break
        nxt = int(logits.argmax()) if temperature <= 0 else int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen))
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return result


# ---------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    train_accuracy: list[float]  # per layer
    test_accuracy: list[float]
    weights: torch.Tensor  # [layer, d_model]
    biases: torch.Tensor  # [layer]
    n_train: int
    n_test: int
    layers: list[str]
    gaps: list[float] = field(default_factory=list)  # class-mean difference along each probe's unit weight


def probe_features(model: HookedTransformer, tokens: torch.Tensor, position: int | None = None) -> torch.Tensor:
    """[layer + 1, batch, d_model]: resid_pre of every layer and the final resid_post, at a position
    (None = last token) of equal-length prompts."""
    names = [utils.get_act_name("resid_pre", l) for l in range(model.cfg.n_layers)] + [utils.get_act_name("resid_post", model.cfg.n_layers - 1)]
    _, cache = store.run_with_cache(model, tokens, names_filter=lambda n: n in names)
    pos = tokens.shape[1] - 1 if position is None else position
    return torch.stack([cache[n][:, pos] for n in names]).float()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [d], b) of an L2-regularised logistic regression on standardised-by-scale features (LBFGS)."""
    scale = x.std().clamp_min(1e-6)
    xs = x / scale
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    yf = y.float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yf) + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w.detach() / scale), b.detach()


def train_probes(features: torch.Tensor, labels: torch.Tensor, test_share: float = 0.3, seed: int = 0,
                 layer_names: list[str] | None = None) -> ProbeResult:
    """A logistic-regression probe per layer. features [layer, n, d_model], labels [n] in {0, 1}."""
    labels = labels.long()
    counts = torch.bincount(labels, minlength=2)
    if counts.numel() > 2 or (labels < 0).any():
        raise SteeringError("Probe labels must be 0 or 1.")
    if int(counts.min()) < MIN_PROBE_PROMPTS:
        raise SteeringError(f"Too few labelled prompts: {int(counts[0])} of class 0 and {int(counts[1])} of class 1; "
                            f"a probe needs at least {MIN_PROBE_PROMPTS} of each.")
    gen = torch.Generator().manual_seed(seed)
    test_parts, train_parts = [], []
    for c in (0, 1):  # stratified: each class split in the same proportion
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = max(1, int(round(len(idx) * test_share)))
        test_parts.append(idx[:k])
        train_parts.append(idx[k:])
    test, train = torch.cat(test_parts), torch.cat(train_parts)
    tr_acc, te_acc, ws, bs, gaps = [], [], [], [], []
    for layer in range(features.shape[0]):
        x = features[layer]
        w, b = fit_logistic(x[train], labels[train])
        pred = (x @ w + b > 0).long()
        tr_acc.append(float((pred[train] == labels[train]).float().mean()))
        te_acc.append(float((pred[test] == labels[test]).float().mean()))
        u = w / w.norm().clamp_min(1e-12)
        xt, yt = x[train], labels[train]
        gaps.append(float(xt[yt == 1].mean(0) @ u - xt[yt == 0].mean(0) @ u))
        ws.append(w)
        bs.append(b)
    names = layer_names or [f"layer {l}" for l in range(features.shape[0])]
    return ProbeResult(tr_acc, te_acc, torch.stack(ws), torch.stack(bs), len(train), len(test), names, gaps)


def probe_direction(result: ProbeResult, layer: int, name: str = "probe", model_name: str | None = None) -> Direction:
    if layer >= len(result.layers) - 1:
        raise SteeringError("The final resid_post probe has no layer to steer at; pick an earlier layer.")
    w, b = result.weights[layer], float(result.biases[layer])
    u = w / w.norm().clamp_min(1e-12)
    # Scaled like a contrast direction: the class-mean gap along the probe's unit weight, so α = 1
    # moves a prompt by about the distance between the classes; its threshold is the decision boundary.
    return Direction(name, utils.get_act_name("resid_pre", layer), (u * result.gaps[layer]).clone(), "probe",
                     {"model": model_name, "test_accuracy": result.test_accuracy[layer],
                      "threshold": -b / float(w.norm().clamp_min(1e-12))})


def prompt_probe_features(model: HookedTransformer, prompts: list[str], position: int | None = None) -> torch.Tensor:
    """[layer + 1, n, d_model] like `probe_features`, for prompts of any lengths (one run each)."""
    rows = [probe_features(model, tokens[None], position)[:, 0] for tokens in _prompt_tokens(model, prompts)]
    if not rows:
        return torch.zeros(model.cfg.n_layers + 1, 0, model.cfg.d_model)
    return torch.stack(rows, dim=1)


def probe_layer_names(model: HookedTransformer) -> list[str]:
    return [f"L{l} resid_pre" for l in range(model.cfg.n_layers)] + [f"L{model.cfg.n_layers - 1} resid_post"]


def task_probe_data(model: HookedTransformer, task: str, n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(features, labels, what the label means) from a built-in task's clean prompts.

    sva: 1 = plural subject; ioi: 1 = the indirect object is the first name (ABBA). Read at the last token.
    """
    from core import tasks

    if task == "sva":
        # Attractors of random number: with "opposite" ones the last token (the attractor) would give the label away.
        t = tasks.sva(model, n=n, seed=seed, split="train", attractor="random")
        labels = torch.tensor([1 if i % 2 == 0 else 0 for i in range(len(t))])
        meaning = "1 = plural subject, 0 = singular (attractors of random number)"
    elif task == "ioi":
        t = tasks.ioi(model, n=n, seed=seed, split="train")
        labels = torch.tensor([1 if order == "ABBA" else 0 for order in t.info["orders"]])
        meaning = "1 = the indirect object is named first (ABBA), 0 = second (BABA)"
    else:
        raise SteeringError(f"No probe labels for task {task!r}: 'sva' or 'ioi'.")
    return probe_features(model, t.clean_tokens), labels, meaning


def probes_with_control(model: HookedTransformer, source: str, positive: list[str] | None = None,
                        negative: list[str] | None = None):
    """(probes, shuffled-label control probes, what the labels mean) for one layer each.

    source "typed": label 1 for the `positive` prompts and 0 for the `negative` ones (read at each
    prompt's last token); otherwise a task's labelled prompts (`task_probe_data`). The control is
    trained on the same features with the labels shuffled (seeded): a probe that beats it reads
    information that is there, not noise.
    """
    if source == "typed":
        positive, negative = list(positive or []), list(negative or [])
        x = prompt_probe_features(model, positive + negative)
        y = torch.tensor([1] * len(positive) + [0] * len(negative))
        meaning = "1 = the left list, 0 = the right list; read at each prompt's last token"
    else:
        x, y, meaning = task_probe_data(model, source)
    names = probe_layer_names(model)
    real = train_probes(x, y, layer_names=names)
    shuffled = train_probes(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))], layer_names=names)
    return real, shuffled, meaning


def direction_file(direction: Direction) -> bytes:
    """A direction's vector as a safetensors file (for a download)."""
    from safetensors.torch import save

    return save({"vector": direction.vector.contiguous()})
