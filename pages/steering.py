"""Steering page: build directions, steer generation, run the glass-box monitor, train probes."""

import streamlit as st

# See pages/attention.py: every page sets the wide layout itself.
st.set_page_config(layout="wide")
st.title("Steering and monitoring")
with st.spinner("Starting: loading TransformerLens…"):
    import torch

    from core import plots, saes, session, steering
    from core.steering import SteeringError

view = session.page_view()
model = view.model
model_id = session.model_key(model)
state = st.session_state
decode = lambda t: session.decode_token(model, t)  # noqa: E731

# The default contrast: plural against singular subjects; the direction is read at the subject
# (position 2: BOS, "The", the noun) one layer in.
PLURAL = "The keys on the table\nThe books near the door\nThe dogs behind the house\nThe cars by the road\n" \
         "The cups on the chair\nThe boxes near the window\nThe trees by the river\nThe cats under the table"
SINGULAR = "The key on the table\nThe book near the door\nThe dog behind the house\nThe car by the road\n" \
           "The cup on the chair\nThe box near the window\nThe tree by the river\nThe cat under the table"
DEFAULT_LAYER = min(1, model.cfg.n_layers - 1)

# Directions live per session and model (built here) and on disk (saved).
store_key = f"_directions::{model_id}"
directions: dict = state.setdefault(store_key, {})
if "plural" not in directions and not state.get(f"_no_default::{model_id}"):
    try:
        directions["plural"] = steering.contrastive_direction(model, PLURAL.splitlines(), SINGULAR.splitlines(),
                                                              DEFAULT_LAYER, 2, name="plural")
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


VIEWS = {"build": "Directions", "steer": "Steer", "monitor": "Monitor", "probe": "Probes"}
view_choice = st.segmented_control("View", list(VIEWS), format_func=VIEWS.get, default="steer", key="st_view",
                                   persist_state="session", label_visibility="collapsed", required=True) or "steer"


def build_view() -> None:
    st.markdown("**From contrasting prompts**: the mean difference of the residual stream (`resid_pre` of a layer) "
                "at one position, prompts on the left minus prompts on the right. One prompt per line.")
    c1, c2 = st.columns(2)
    pos_text = c1.text_area("Prompts with the property", PLURAL, key="st_pos", height=180, persist_state="session")
    neg_text = c2.text_area("Prompts without it", SINGULAR, key="st_neg", height=180, persist_state="session")
    d1, d2, d3 = st.columns(3)
    layer = d1.number_input(f"Layer (0–{model.cfg.n_layers - 1})", 0, model.cfg.n_layers - 1, DEFAULT_LAYER, key="st_layer")
    position = d2.number_input("Position (0 = BOS; −1 = each prompt's last token)", -1, model.cfg.n_ctx - 1, 2, key="st_pos_i")
    name = d3.text_input("Name", "plural", key="st_name")
    if st.button("Build the direction", key="st_build"):
        try:
            d = steering.contrastive_direction(model, pos_text.splitlines(), neg_text.splitlines(), int(layer),
                                               None if position < 0 else int(position), name=name.strip() or "contrast")
            if not steering.NAME_RE.match(d.name):
                raise SteeringError("A direction's name is 1–64 letters, digits, '.', '_' or '-'.")
            directions[d.name] = d
            st.success(session.md_escape(f"Built {describe(d)} from {d.info['positive']} and {d.info['negative']} prompts."))
        except SteeringError as err:
            st.warning(session.md_escape(str(err)))
    embedded = [n for n in saes.embedded_saes(model.cfg.model_name)]
    if embedded:
        st.markdown("**From an SAE feature**: its decoder direction (residual-stream SAEs).")
        s1, s2, s3 = st.columns(3)
        sae_name = s1.selectbox("Embedded SAE", embedded, key="st_sae")
        loaded = session.load_sae("embedded", sae_name)
        feature = s2.number_input(f"Feature (0–{loaded.d_sae - 1})", 0, loaded.d_sae - 1, 0, key="st_feature")
        if s3.button("Use this feature", key="st_use_feature"):
            try:
                d = steering.sae_direction(loaded, int(feature), model_name=model.cfg.model_name)
                directions[d.name] = d
                st.success(session.md_escape(f"Added {describe(d)}."))
            except SteeringError as err:
                st.warning(session.md_escape(str(err)))
    st.markdown("**Directions** (this session's, then saved ones). Probes add theirs from the Probes view.")
    for name in available():
        try:
            d = get_direction(name)
        except SteeringError as err:
            st.caption(session.md_escape(f"{name}: {err}"))
            continue
        r1, r2, r3 = st.columns([4, 1, 1])
        r1.caption(session.md_escape(describe(d)))
        if r2.button("Save", key=f"st_save_{name}"):
            try:
                steering.save_direction(d)
                st.toast(f"Saved {name}")
            except SteeringError as err:
                st.warning(str(err))
        from safetensors.torch import save as st_save

        r3.download_button("Download", st_save({"vector": d.vector.contiguous()}), file_name=f"{name}.safetensors",
                           key=f"st_dl_{name}")


def pick_direction(key: str):
    names = list(available())
    if not names:
        st.info("No direction yet: build one in the Directions view.")
        return None
    if state.get(key) not in names:
        state[key] = names[0]
    name = st.selectbox("Direction", names, key=key)
    try:
        return get_direction(name)
    except SteeringError as err:
        st.warning(session.md_escape(str(err)))
        return None


@torch.inference_mode()
def agreement_check(hooks) -> str | None:
    """On held-out singular-subject agreement prompts: how often ' are' beats ' is', without and with the hooks."""
    from core import tasks

    try:
        t = tasks.sva(model, n=64, seed=5, split="held_out")
    except tasks.TaskError:
        return None
    singular = t.clean_tokens[1::2]
    is_, are = int(t.wrongs[0]), int(t.answers[0])
    from core import store

    base = session.get_store().get(model, singular).logits[:, -1]  # the unsteered run, shared with other pages
    steered = store.run_with_hooks(model, singular, hooks)[:, -1]
    b = float((base[:, are] > base[:, is_]).float().mean())
    s = float((steered[:, are] > steered[:, is_]).float().mean())
    return (f"Measured on {len(singular)} held-out agreement prompts with a singular subject (template '{t.template}'): "
            f"' are' beats ' is' in {b:.0%} unsteered and {s:.0%} steered.")


def steer_view() -> None:
    d = pick_direction("st_dir")
    if d is None:
        return
    st.caption(session.md_escape(describe(d)))
    c1, c2, c3 = st.columns(3)
    mode = c1.segmented_control("Intervention", ["add", "ablate"], format_func={"add": "Add α × direction",
                                "ablate": "Project it out"}.get, default="add", key="st_mode", required=True) or "add"
    alpha = c2.number_input("α (multiples of the direction)", -1000.0, 1000.0, 1.0, 0.25, key="st_alpha",
                            disabled=mode != "add")
    from_pos = c3.number_input("From position (0 = every position)", 0, model.cfg.n_ctx - 1, 0, key="st_from")
    prompt = st.text_input("Prompt", "The key on the cabinet", key="st_prompt", persist_state="session")
    if not prompt.strip():
        st.warning("The prompt is empty: type some text to steer.")
        return
    try:
        hooks = steering.steering_hooks(model, d, mode, float(alpha), int(from_pos))
    except SteeringError as err:
        st.warning(session.md_escape(str(err)))
        return
    tokens = session.to_tokens(model, prompt)
    shift = steering.next_token_shift(model, tokens, hooks, base_logits=session.get_store().get(model, tokens).logits)
    rows = shift["rows"][:10]
    st.plotly_chart(plots.distribution_shift_bars([decode(r["token"]) for r in rows], [r["before"] for r in rows],
                                                  [r["after"] for r in rows], "Next token, unsteered and steered"),
                    width="stretch", key="st_shift")
    st.caption(session.md_escape(
        f"Top next token {decode(shift['top_before'])!r} → {decode(shift['top_after'])!r}; KL(unsteered ‖ steered) "
        f"= {shift['kl']:.4f} nats."))
    check = agreement_check(hooks)
    if check:
        st.caption(check)
    g1, g2, g3 = st.columns(3)
    n_new = g1.slider("Tokens to generate", 1, 40, 12, key="st_n")
    temperature = g2.slider("Temperature (0 = greedy)", 0.0, 2.0, 1.0, 0.1, key="st_temp")
    seed = g3.number_input("Seed", 0, 10**6, 0, key="st_seed")
    with st.spinner("Generating…"):
        plain = steering.generate(model, tokens, n_new, (), int(seed), temperature)
        steered = steering.generate(model, tokens, n_new, hooks, int(seed), temperature)
    a, b = st.columns(2)
    a.markdown("**Unsteered**")
    a.code(session.decode_text(model, plain[0, tokens.shape[1]:]), language=None, wrap_lines=True)
    b.markdown("**Steered**")
    b.code(session.decode_text(model, steered[0, tokens.shape[1]:]), language=None, wrap_lines=True)
    st.caption(f"Both from seed {int(seed)}: they differ only where the steering changes the distribution.")


def monitor_view() -> None:
    names = list(available())
    if not names:
        st.info("No direction yet: build one in the Directions view.")
        return
    watched = st.multiselect("Watch", names, default=names[:1], key="st_watch")
    watches = []
    for name in watched:
        try:
            d = get_direction(name)
        except SteeringError as err:
            st.warning(session.md_escape(str(err)))
            continue
        c1, c2, c3 = st.columns(3)
        default = float(d.info.get("threshold", float(d.vector.norm()) / 2))
        threshold = c1.number_input(f"Threshold on {name} (x · û)", value=round(default, 3), key=f"st_thr_{model_id}_{name}",
                                    help="For a contrast direction the default is three quarters of the way from the right-hand prompts' "
                                    "mean projection to the left-hand prompts'.")
        action = c2.selectbox(f"When crossed ({name})", ["ablate", "subtract", "none"], key=f"st_act_{model_id}_{name}",
                              format_func={"ablate": "project it out from there on", "subtract": "subtract α · û from there on",
                                           "none": "only mark it"}.get)
        alpha = c3.number_input(f"α ({name})", -1000.0, 1000.0, 10.0, key=f"st_ma_{model_id}_{name}", disabled=action != "subtract")
        watches.append(steering.Watch(d, float(threshold), action, float(alpha)))
    prompt = st.text_input("Prompt", "The keys on the", key="st_mprompt", persist_state="session")
    n_new = st.slider("Tokens to generate", 0, 40, 8, key="st_mn")
    if not watches or not prompt.strip():
        st.info("Pick a direction to watch and type a prompt.")
        return
    tokens = session.to_tokens(model, prompt)
    chart = st.empty()

    def draw(result) -> None:
        labels = [decode(t) for t in result.tokens[0].tolist()]
        chart.plotly_chart(plots.monitor_lines(labels, result.projections, [w.direction.name for w in watches],
                                               [w.threshold for w in watches], result.tripped_at, result.prompt_len),
                           width="stretch", key=f"st_monitor_{len(labels)}")

    try:
        result = steering.monitored_generate(model, tokens, int(n_new), watches, on_step=draw)
    except SteeringError as err:
        st.warning(session.md_escape(str(err)))
        return
    labels = [decode(t) for t in result.tokens[0].tolist()]
    for w, at in zip(watches, result.tripped_at):
        if at is None:
            st.caption(session.md_escape(f"{w.direction.name}: never crossed {w.threshold:.3f}."))
        else:
            st.caption(session.md_escape(f"{w.direction.name}: crossed {w.threshold:.3f} at position {at} ({labels[at]!r}); "
                                         f"'{w.action}' applied from there on."))
    st.code(session.decode_text(model, result.tokens[0, 1:]), language=None, wrap_lines=True)


@st.cache_data(show_spinner=False, max_entries=16)
def probes(_model, model_id: str, source: str, ones: tuple, zeros: tuple):
    """(probes, shuffled-label control probes, label meaning), once per model and labelled prompts."""
    if source == "typed":
        x = steering.prompt_probe_features(_model, list(ones + zeros))
        y = torch.tensor([1] * len(ones) + [0] * len(zeros))
        meaning = "1 = the left list, 0 = the right list; read at each prompt's last token"
    else:
        x, y, meaning = steering.task_probe_data(_model, source)
    names = steering.probe_layer_names(_model)
    real = steering.train_probes(x, y, layer_names=names)
    shuffled = steering.train_probes(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))], layer_names=names)
    return real, shuffled, meaning


def probe_view() -> None:
    source = st.segmented_control("Labelled prompts", ["sva", "ioi", "typed"], default="sva", key="st_psrc", required=True,
                                  format_func={"sva": "Agreement: plural or singular subject",
                                               "ioi": "IOI: indirect object named first or second",
                                               "typed": "Typed: two lists"}.get) or "sva"
    ones = zeros = ()
    if source == "typed":
        c1, c2 = st.columns(2)
        ones = c1.text_area("Label 1 (one prompt per line)", PLURAL, key="st_p1", height=180).splitlines()
        zeros = c2.text_area("Label 0 (one prompt per line)", SINGULAR, key="st_p0", height=180).splitlines()
        ones, zeros = tuple(p for p in ones if p.strip()), tuple(p for p in zeros if p.strip())
    try:
        with st.spinner("Training a probe per layer…"):
            real, shuffled, meaning = probes(model, model_id, source, ones, zeros)
        names = real.layers
    except (SteeringError, ValueError) as err:
        st.warning(session.md_escape(str(err)))
        return
    st.plotly_chart(plots.probe_accuracy_lines(names, real.test_accuracy, shuffled.test_accuracy, real.train_accuracy),
                    width="stretch", key="st_probe_chart")
    st.caption(session.md_escape(
        f"Labels: {meaning}. Logistic regression (L2) on the residual stream at the last token, per layer; "
        f"{real.n_train} training and {real.n_test} held-out prompts. The control trains on the same prompts with "
        f"shuffled labels: a probe that beats it reads information that is there, not noise."))
    layer = st.selectbox("Use a probe as a direction", list(range(len(names) - 1)), format_func=lambda l: names[l],
                         key="st_probe_layer")
    if st.button("Add this probe's direction", key="st_probe_add"):
        d = steering.probe_direction(real, int(layer), name=f"probe-{source}-L{layer}", model_name=model.cfg.model_name)
        directions[d.name] = d
        st.success(session.md_escape(f"Added {describe(d)} (held-out accuracy {real.test_accuracy[layer]:.0%})."))


{"build": build_view, "steer": steer_view, "monitor": monitor_view, "probe": probe_view}[view_choice]()
session.sidebar_footer()
