"""Steering page: build directions, steer generation, run the glass-box monitor, train probes."""

import streamlit as st

from core import plots, saes, steering
from core.steering import SteeringError
from core.ui import cache, charts, frame
from core.ui import state as ui

view = ui.page_view()
model = view.model
model_id = view.model_id
state = st.session_state
decode = lambda t: ui.decode_token(model, t)  # noqa: E731

# The default contrast (core.steering): plural against singular subjects; the direction is read at
# the subject (position 2: BOS, "The", the noun) one layer in.
PLURAL = "\n".join(steering.PLURAL_PROMPTS)
SINGULAR = "\n".join(steering.SINGULAR_PROMPTS)
DEFAULT_LAYER = steering.default_layer(model)

# One-line explanations for the words of the field, shown as tooltips where they appear.
HELP = {
    "resid_pre": "resid_pre of layer L (TransformerLens's `blocks.L.hook_resid_pre`) is the residual stream as it "
                 "enters layer L: the running sum of the embeddings and every earlier layer's output, one vector per token.",
    "alpha": "α (alpha) says how much of the direction to add: α = 1 adds the direction once, α = 2 twice, "
             "a negative α pushes the other way.",
    "ablate": "Directional ablation (projecting the direction out): remove from each token's residual stream its "
              "component along the direction, x − (x · û) û, so the model can no longer read it there.",
    "kl": "KL divergence: how different the steered next-token distribution is from the unsteered one, in nats "
          "(natural-log units). "
          "0 means identical; the larger, the more steering changed the prediction.",
    "probe": "A probe is a small classifier (here logistic regression) trained to read a property, such as plural "
             "or singular subject, from the residual stream. If it beats chance on held-out prompts, the "
             "information is linearly readable there.",
    "projection": "The projection x · û measures how far the residual stream x points along the direction "
                  "(û is the direction scaled to length 1).",
}


def demo_notice() -> None:
    """Where the default demonstration does not work on this model, say so and offer the model it needs."""
    check = cache.demo_check(model)
    if check.works:
        return
    with st.container(border=True):
        st.info(ui.md_escape(
            f"The demonstrations on this page (the default plural direction turning ' is' into ' are', the monitor "
            f"tripping at 'keys') need a model that learned subject–verb agreement. Measured here: {check.reason} "
            f"You can still build your own directions below."))
        if model.cfg.model_name != steering.DEMO_MODEL and steering.demo_model_available():
            st.button(f"Switch to {steering.DEMO_MODEL}, where it works", key="steer_switch_demo", type="primary",
                      on_click=frame.switch_model, args=(steering.DEMO_MODEL,))


# Directions live per session and model (built here) and on disk (saved).
store_key = f"_directions::{model_id}"
directions: dict = state.setdefault(store_key, {})
if "plural" not in directions and not state.get(f"_no_default::{model_id}"):
    try:
        directions["plural"] = steering.default_direction(model)
    except SteeringError:
        state[f"_no_default::{model_id}"] = True


def available() -> dict:
    """Session directions, then saved ones that fit this model (saved ones load on use)."""
    out = dict(directions)
    for name in steering.list_directions():
        if name not in out:
            out[name] = None
    return out


def get_direction(name: str):
    d = directions.get(name)
    if d is None:
        d = steering.load_direction(name)
    steering.check_direction(model, d)
    return d


def describe(d) -> str:
    return f"{d.name}: {d.source} direction at {d.hook_name}, norm {float(d.vector.norm()):.2f}"


demo_notice()
VIEWS = frame.STEER_VIEWS  # kept in the URL (bind): a link or a lesson opens a view
view_choice = st.segmented_control("View", list(VIEWS), format_func=VIEWS.get, default="steer", key="steer_view",
                                   persist_state="session", bind="query-params", label_visibility="collapsed", required=True) or "steer"


def build_view() -> None:
    st.markdown("**From contrasting prompts**: the mean difference of the residual stream (`resid_pre` of a layer) "
                "at one position, prompts on the left minus prompts on the right. One prompt per line.",
                help=HELP["resid_pre"])
    c1, c2 = st.columns(2)
    pos_text = c1.text_area("Prompts with the property", PLURAL, key="steer_pos", height=180, persist_state="session")
    neg_text = c2.text_area("Prompts without it", SINGULAR, key="steer_neg", height=180, persist_state="session")
    d1, d2, d3 = st.columns(3)
    layer = d1.number_input(f"Layer (0–{model.cfg.n_layers - 1})", 0, model.cfg.n_layers - 1, DEFAULT_LAYER, key="steer_layer",
                            help="The direction is read at this layer's resid_pre. " + HELP["resid_pre"])
    position = d2.number_input("Position (0 = BOS; −1 = each prompt's last token)", -1, model.cfg.n_ctx - 1, 2, key="steer_pos_i")
    name = d3.text_input("Name", "plural", key="steer_name", max_chars=steering.MAX_NAME_CHARS, help=steering.NAME_RULE)
    if st.button("Build the direction", key="steer_build"):
        try:
            name = steering.check_name(name.strip() or "contrast")  # it becomes a file name when saved
            d = steering.contrastive_direction(model, pos_text.splitlines(), neg_text.splitlines(), int(layer),
                                               None if position < 0 else int(position), name=name)
            directions[d.name] = d
            st.success(ui.md_escape(f"Built {describe(d)} from {d.info['positive']} and {d.info['negative']} prompts."))
        except SteeringError as err:
            st.warning(ui.md_escape(str(err)))
    embedded = [n for n in saes.embedded_saes(model.cfg.model_name)]
    if embedded:
        st.markdown("**From an SAE feature**: its decoder direction (residual-stream SAEs).")
        s1, s2, s3 = st.columns(3)
        sae_name = s1.selectbox("Embedded SAE", embedded, key="steer_sae")
        loaded = cache.load_sae("embedded", sae_name)
        feature = s2.number_input(f"Feature (0–{loaded.d_sae - 1})", 0, loaded.d_sae - 1, 0, key="steer_feature")
        if s3.button("Use this feature", key="steer_use_feature"):
            try:
                d = steering.sae_direction(loaded, int(feature), model_name=model.cfg.model_name)
                directions[d.name] = d
                st.success(ui.md_escape(f"Added {describe(d)}."))
            except SteeringError as err:
                st.warning(ui.md_escape(str(err)))
    st.markdown("**Directions** (this session's, then saved ones). Probes add theirs from the Probes view.",
                help=HELP["probe"])
    for name in available():
        try:
            d = get_direction(name)
        except SteeringError as err:
            st.caption(ui.md_escape(f"{name}: {err}"))
            continue
        r1, r2, r3 = st.columns([4, 1, 1])
        r1.caption(ui.md_escape(describe(d)))
        if r2.button("Save", key=f"steer_save_{name}"):
            try:
                steering.save_direction(d)
                st.toast(f"Saved {name}")
            except SteeringError as err:  # a bad name, a full disk: nothing half-written is left
                st.warning(ui.md_escape(str(err)))
        r3.download_button("Download", steering.direction_file(d), file_name=f"{name}.safetensors",
                           key=f"steer_dl_{name}")


def pick_direction(key: str):
    names = list(available())
    if not names:
        st.info("No direction yet: build one in the Directions view.")
        return None
    if state.get(key) not in names:
        state[key] = names[0]
    name = st.selectbox("Direction", names, key=key,
                        help="A vector in the residual stream, read and written at one layer's resid_pre. " + HELP["resid_pre"])
    try:
        return get_direction(name)
    except SteeringError as err:
        st.warning(ui.md_escape(str(err)))
        return None


def agreement_check(hooks, steer: tuple) -> str | None:
    """On held-out singular-subject agreement prompts: how often ' are' beats ' is', without and with the hooks."""
    flip = cache.agreement_flip(model, hooks, steer)  # kept per direction and intervention
    if flip is None:
        return None
    return (f"Measured on {flip.n} held-out agreement prompts with a singular subject (template '{flip.template}'): "
            f"' are' beats ' is' in {flip.unsteered:.0%} unsteered and {flip.steered:.0%} steered.")


def generated_text(column, title: str, seq, prompt_len: int) -> None:
    """The prompt and its continuation as the tokenizer decodes the whole sequence; a note where the
    decoder joined a word piece onto the word before it ('jane' + '##98' → 'jane98')."""
    column.markdown(f"**{title}**")
    text, glued, labels = cache.sequence_texts(model, seq.tolist())
    column.code(text, language=None, wrap_lines=True)
    glued = [i for i in glued if i >= prompt_len]
    if glued:
        pairs = ", ".join(f"{labels[i - 1]!r} + {labels[i]!r}" for i in glued[:4]) + (" …" if len(glued) > 4 else "")
        column.caption(ui.md_escape(
            f"Word pieces: {pairs}. A piece marked ## continues the token before it, so the tokenizer writes the two "
            "as one word: the model chose that piece there."))


def steer_view() -> None:
    d = pick_direction("steer_dir")
    if d is None:
        return
    st.caption(ui.md_escape(describe(d)))
    c1, c2, c3 = st.columns(3)
    mode = c1.segmented_control("Intervention", ["add", "ablate"], format_func={"add": "Add α × direction",
                                "ablate": "Project it out"}.get, default="add", key="steer_mode", required=True,
                                help="Add: " + HELP["alpha"] + " Project it out: " + HELP["ablate"]) or "add"
    alpha = c2.number_input("α (multiples of the direction)", -1000.0, 1000.0, 1.0, 0.25, key="steer_alpha",
                            disabled=mode != "add", help=HELP["alpha"])
    from_pos = c3.number_input("From position (0 = every position)", 0, model.cfg.n_ctx - 1, 0, key="steer_from",
                               help="Token positions count from 0 (BOS, the start token the model adds); the intervention "
                               "applies at this position and every later one.")
    prompt = st.text_input("Prompt", "The key on the cabinet", key="steer_prompt", persist_state="session")
    if not prompt.strip():
        st.warning("The prompt is empty: type some text to steer.")
        return
    try:
        hooks = steering.steering_hooks(model, d, mode, float(alpha), int(from_pos))
    except SteeringError as err:
        st.warning(ui.md_escape(str(err)))
        return
    tokens = ui.to_tokens(model, prompt)
    # Kept per model, direction, intervention and prompt (cache.steering_key): a rerun that changes none of
    # them, such as a new sidebar prompt (this view has its own), runs no forward pass.
    steer = cache.steering_key(model, d, mode, float(alpha), int(from_pos))
    shift = cache.next_token_shift(model, tokens, hooks, steer)
    rows = shift["rows"]  # the unsteered top 10 and the steered top 10 together
    texts = cache.token_texts(model, [r["token"] for r in rows])
    charts.show(plots.distribution_shift_bars(texts, [r["before"] for r in rows],
                                                  [r["after"] for r in rows], "Next token, unsteered and steered"),
                width="stretch", key="steer_shift")
    st.caption(ui.md_escape(
        f"Top next token {decode(shift['top_before'])!r} → {decode(shift['top_after'])!r}; KL(unsteered ‖ steered) "
        f"= {shift['kl']:.4f} nats. The bars: the 10 most likely next tokens without steering and the 10 most likely "
        f"with it ({len(rows)} tokens), most likely first."), help=HELP["kl"])
    check = agreement_check(hooks, steer)
    if check:
        st.caption(check)
    g1, g2, g3 = st.columns(3)
    n_new = g1.slider("Tokens to generate", 1, 40, 12, key="steer_n")
    temperature = g2.slider("Temperature (0 = greedy)", 0.0, 2.0, 1.0, 0.1, key="steer_temp")
    seed = g3.number_input("Seed", 0, 10**6, 0, key="steer_seed")
    with st.spinner("Generating…"):
        plain = cache.generate(model, tokens, n_new, (), None, int(seed), temperature)
        steered = cache.generate(model, tokens, n_new, hooks, steer, int(seed), temperature)
    a, b = st.columns(2)
    generated_text(a, "Unsteered", plain[0], tokens.shape[1])
    generated_text(b, "Steered", steered[0], tokens.shape[1])
    st.caption(f"The prompt and what the model wrote after it. Both from seed {int(seed)}: they differ only where "
               "the steering changes the distribution.")


def monitor_view() -> None:
    names = list(available())
    if not names:
        st.info("No direction yet: build one in the Directions view.")
        return
    watched = st.multiselect("Watch", names, default=names[:1], key="steer_watch",
                             help="The glass-box monitor: while the model writes, it measures at every token how far the "
                             "residual stream points along each watched direction, and acts when that passes a threshold. "
                             + HELP["projection"])
    watches = []
    for name in watched:
        try:
            d = get_direction(name)
        except SteeringError as err:
            st.warning(ui.md_escape(str(err)))
            continue
        c1, c2, c3 = st.columns(3)
        default = float(d.info.get("threshold", float(d.vector.norm()) / 2))
        threshold = c1.number_input(f"Threshold on {name} (x · û)", value=round(default, 3), key=f"steer_thr_{model_id}_{name}",
                                    help=HELP["projection"] + " For a contrast direction the default threshold is three "
                                    "quarters of the way from the right-hand prompts' mean projection to the left-hand prompts'.")
        action = c2.selectbox(f"When crossed ({name})", ["ablate", "subtract", "none"], key=f"steer_act_{model_id}_{name}",
                              format_func={"ablate": "project it out from there on", "subtract": "subtract α · û from there on",
                                           "none": "only mark it"}.get,
                              help="Project it out: " + HELP["ablate"] + " Subtract: push the residual stream back along "
                              "the direction by α (û has length 1).")
        alpha = c3.number_input(f"α ({name})", -1000.0, 1000.0, 10.0, key=f"steer_ma_{model_id}_{name}", disabled=action != "subtract",
                                help=HELP["alpha"])
        watches.append(steering.Watch(d, float(threshold), action, float(alpha)))
    prompt = st.text_input("Prompt", "The keys on the", key="steer_mprompt", persist_state="session")
    n_new = st.slider("Tokens to generate", 0, 40, 8, key="steer_mn")
    if not watches or not prompt.strip():
        st.info("Pick a direction to watch and type a prompt.")
        return
    tokens = ui.to_tokens(model, prompt)
    chart = st.empty()

    def draw(result) -> None:
        labels = steering.token_labels(model, result.tokens[0].tolist())  # '##98': a piece glued to the token before
        charts.show(plots.monitor_lines(labels, result.projections, [w.direction.name for w in watches],
                                        [w.threshold for w in watches], result.tripped_at, result.prompt_len),
                    width="stretch", key=f"steer_monitor_{len(labels)}", where=chart)

    try:
        result = steering.monitored_generate(model, tokens, int(n_new), watches, on_step=draw)
    except SteeringError as err:
        st.warning(ui.md_escape(str(err)))
        return
    labels = steering.token_labels(model, result.tokens[0].tolist())
    for w, at in zip(watches, result.tripped_at):
        if at is None:
            st.caption(ui.md_escape(f"{w.direction.name}: never crossed {w.threshold:.3f}."))
        else:
            st.caption(ui.md_escape(f"{w.direction.name}: crossed {w.threshold:.3f} at position {at} ({labels[at]!r}); "
                                         f"'{w.action}' applied from there on."))
    st.code(steering.sequence_text(model, result.tokens[0]), language=None, wrap_lines=True)


def probe_view() -> None:
    source = st.segmented_control("Labelled prompts", ["sva", "ioi", "typed"], default="sva", key="steer_psrc", required=True,
                                  format_func={"sva": "Agreement: plural or singular subject",
                                               "ioi": "IOI: indirect object named first or second",
                                               "typed": "Typed: two lists"}.get,
                                  help="Prompts with a known label to train probes on. " + HELP["probe"]) or "sva"
    ones = zeros = ()
    if source == "typed":
        c1, c2 = st.columns(2)
        ones = c1.text_area("Label 1 (one prompt per line)", PLURAL, key="steer_p1", height=180).splitlines()
        zeros = c2.text_area("Label 0 (one prompt per line)", SINGULAR, key="steer_p0", height=180).splitlines()
        ones, zeros = tuple(p for p in ones if p.strip()), tuple(p for p in zeros if p.strip())
    try:
        with st.spinner("Training a probe per layer…"):
            real, shuffled, meaning = cache.probes(model, source, ones, zeros)
        names = real.layers
    except (SteeringError, ValueError) as err:
        st.warning(ui.md_escape(str(err)))
        return
    charts.show(plots.probe_accuracy_lines(names, real.test_accuracy, shuffled.test_accuracy, real.train_accuracy),
                width="stretch", key="steer_probe_chart")
    st.caption(ui.md_escape(
        f"Labels: {meaning}. Logistic regression (L2) on the residual stream at the last token, per layer; "
        f"{real.n_train} training and {real.n_test} held-out prompts. The control trains on the same prompts with "
        f"shuffled labels: a probe that beats it reads information that is there, not noise."),
        help=HELP["probe"] + " Layers: " + HELP["resid_pre"] + " The last one, resid_post, is the residual stream "
        "after the final layer.")
    layer = st.selectbox("Use a probe as a direction", list(range(len(names) - 1)), format_func=lambda l: names[l],
                         key="steer_probe_layer",
                         help="The probe's weight vector points from one label to the other: used as a direction, adding "
                         "it pushes the residual stream toward label 1 (scaled so α = 1 moves it about the gap between the "
                         "two labels' means).")
    if st.button("Add this probe's direction", key="steer_probe_add"):
        d = steering.probe_direction(real, int(layer), name=f"probe-{source}-L{layer}", model_name=model.cfg.model_name)
        directions[d.name] = d
        st.success(ui.md_escape(f"Added {describe(d)} (held-out accuracy {real.test_accuracy[layer]:.0%})."))


{"build": build_view, "steer": steer_view, "monitor": monitor_view, "probe": probe_view}[view_choice]()
ui.sidebar_footer()
