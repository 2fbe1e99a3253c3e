"""Batched path patching (core.path_patching) against a plain implementation, ARENA's way.

The reference below is written independently of the engine: one TransformerLens
`run_with_hooks` per sender, with a hook on every `hook_z` that writes the corrupted z into the
sender's head and the clean z into every other head (ARENA's `patch_or_freeze_head_vectors`);
for q/k/v receivers a second `run_with_hooks` writes the receivers' recorded q/k/v (ARENA's
`patch_head_input`). The full forward pass builds the padding mask itself on left-padded models.
"""
import pytest
import torch
from random_models import SWITCHES, random_model, random_tokens
from transformer_lens import patching as tlp

from core import path_patching as pp
from core import store, tasks
from core.models import load_model
from core.path_patching import PathPatchingError

ATOL = 1e-4
ANSWER, WRONG = 11, 25


def logit_diff(logits):
    return (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()


# ---------------------------------------------------------------------------------------------
# The plain reference: one forward pass per sender (two for q/k/v receivers)
# ---------------------------------------------------------------------------------------------


def _is_z(name):
    return name.endswith("hook_z")


def _freeze_or_patch(clean, corrupted, sender):
    def hook(z, hook):
        new = clean[hook.name].clone()
        if hook.layer() == sender[0]:
            new[:, :, sender[1]] = corrupted[hook.name][:, :, sender[1]]
        return new
    return hook


def reference(model, clean_tokens, corrupted_tokens, metric, receivers=None, input="logits"):
    cfg = model.cfg
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_tokens)
        _, corrupted = model.run_with_cache(corrupted_tokens)
        out = torch.full((cfg.n_layers, cfg.n_heads), float("nan"))
        top = cfg.n_layers if receivers is None else min(l for l, _ in receivers)
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        group = cfg.n_heads // n_kv if input in ("k", "v") else 1
        names = {f"blocks.{l}.attn.hook_{input}" for l, _ in receivers or []}
        for layer in range(top):
            for head in range(cfg.n_heads):
                freeze = (_is_z, _freeze_or_patch(clean, corrupted, (layer, head)))
                if receivers is None:
                    logits = model.run_with_hooks(clean_tokens, fwd_hooks=[freeze])
                else:
                    saved = {}

                    def save(act, hook):
                        saved[hook.name] = act.clone()

                    model.run_with_hooks(clean_tokens, fwd_hooks=[freeze] + [(n, save) for n in names])

                    def patch(act, hook):
                        for l, h in receivers:
                            if hook.layer() == l:
                                act[:, :, h // group] = saved[hook.name][:, :, h // group]
                        return act

                    logits = model.run_with_hooks(clean_tokens, fwd_hooks=[(n, patch) for n in names])
                out[layer, head] = metric(logits)
    return out


def _close(ours, ref):
    assert ours.shape == ref.shape
    assert torch.equal(ours.isnan(), ref.isnan())
    diff = float((ours - ref).nan_to_num().abs().max())
    assert diff <= ATOL, diff
    return diff


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


CLEAN_TEXTS = ["the old king saw a green bird near the river", "a cat sat", "my friend ran to the big house"]
CORRUPTED_TEXTS = ["the old queen saw a green bird near the river", "a dog sat", "my mother ran to the big house"]


def _pair(name, model, seed=6):
    """(clean, corrupted) [batch, pos]: left-padded sentences of different lengths, or random tokens
    with one position changed."""
    if name == "left-padded":
        clean = store.to_tokens(model, CLEAN_TEXTS, padding_side="left")
        corrupted = store.to_tokens(model, CORRUPTED_TEXTS, padding_side="left")
        assert (clean[:, 0] == model.tokenizer.pad_token_id).any()  # really padded
        assert clean.shape == corrupted.shape
        return clean, corrupted
    clean = random_tokens(model, batch=2, pos=9, seed=seed)
    corrupted = clean.clone()
    corrupted[:, 3] = random_tokens(model, batch=2, pos=9, seed=seed + 1)[:, 3]
    return clean, corrupted


REQUIRED = ("ln-standard", "ln-folded", "rms-rotary", "no-norm", "shortformer-attn-only", "alibi", "gqa-rotary",
            "softcap", "left-padded")
PARAMS = [pytest.param(name, marks=() if name in REQUIRED else pytest.mark.slow) for name in SWITCHES]


@pytest.fixture(scope="module", params=PARAMS, ids=list(SWITCHES))
def switched(request):
    return request.param, random_model(seed=3, **SWITCHES[request.param])


# ---------------------------------------------------------------------------------------------
# Every sweep equals the plain implementation on every architecture
# ---------------------------------------------------------------------------------------------


def test_to_logits_equals_plain_implementation_on_every_architecture(switched):
    name, model = switched
    clean, corrupted = _pair(name, model)
    ours = pp.path_patch_to_logits(model, clean, corrupted, logit_diff)
    _close(ours, reference(model, clean, corrupted, logit_diff))
    assert not ours.isnan().any()
    assert float((ours - ours.mean()).abs().max()) > 1e-3  # not a constant grid


def test_to_heads_equals_plain_implementation_on_every_architecture(switched):
    name, model = switched
    clean, corrupted = _pair(name, model)
    receivers = [(1, 0), (1, 3)]
    spread = 0.0
    for input in ("q", "k", "v"):
        ours = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, receivers, input)
        _close(ours, reference(model, clean, corrupted, logit_diff, receivers, input))
        assert ours[1:].isnan().all() and not ours[0].isnan().any()
        spread = max(spread, float((ours[0] - ours[0].mean()).abs().max()))
    assert spread > 1e-4  # not constant rows


@pytest.fixture(scope="module")
def deep_model():
    """Four layers with MLPs (so MLPs recompute between sender and receivers), GELU, LayerNorm."""
    return random_model(seed=7, n_layers=4)


def test_mlps_recompute_and_receivers_in_two_layers(deep_model):
    model = deep_model
    clean, corrupted = _pair("ln-standard", model, seed=8)
    ours = pp.path_patch_to_logits(model, clean, corrupted, logit_diff)
    _close(ours, reference(model, clean, corrupted, logit_diff))
    for input in ("q", "k", "v"):
        receivers = [(2, 1), (3, 0), (3, 2)]
        ours = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, receivers, input)
        _close(ours, reference(model, clean, corrupted, logit_diff, receivers, input))
        assert ours[2:].isnan().all() and not ours[:2].isnan().any()


def test_mlps_matter_so_the_test_would_see_them_skipped(deep_model):
    """A layer-0 head's path to the logits goes through later MLPs: with MLPs frozen at clean too
    the number differs, so the comparison above checks that they recompute."""
    model = deep_model
    clean, corrupted = _pair("ln-standard", model, seed=8)
    with torch.no_grad():
        _, cc = model.run_with_cache(clean)
        _, kc = model.run_with_cache(corrupted)
        hooks = [(_is_z, _freeze_or_patch(cc, kc, (0, 1)))]
        hooks += [(f"blocks.{l}.hook_mlp_out", lambda act, hook: cc[hook.name]) for l in range(1, 4)]
        frozen_mlps = float(logit_diff(model.run_with_hooks(clean, fwd_hooks=hooks)))
    ours = pp.path_patch_to_logits(model, clean, corrupted, logit_diff)
    assert abs(float(ours[0, 1]) - frozen_mlps) > 1e-3


def test_prompts_that_differ_from_the_first_token_and_chunks_and_progress(deep_model):
    """Corrupted prompts entirely different (no shared prefix), several chunks, progress reported."""
    model = deep_model
    clean = random_tokens(model, batch=3, pos=7, seed=20)
    corrupted = random_tokens(model, batch=3, pos=7, seed=21)
    seen = []
    ours = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, [(3, 1)], "k", progress=seen.append,
                                  max_tokens=3 * 7 * 2)  # two senders per pass
    _close(ours, reference(model, clean, corrupted, logit_diff, [(3, 1)], "k"))
    assert len(seen) == 6 and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    seen.clear()
    whole = pp.path_patch_to_logits(model, clean, corrupted, logit_diff, progress=seen.append)
    chunked = pp.path_patch_to_logits(model, clean, corrupted, logit_diff, max_tokens=1)
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=0)
    assert seen[-1] == pytest.approx(1.0)


def test_gqa_receivers_of_one_key_value_head_patch_it_once():
    """Two query heads of one key/value group: patching k of either or both is the same patch."""
    model = random_model(seed=3, **SWITCHES["gqa-rotary"])
    clean, corrupted = _pair("gqa-rotary", model)
    one = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, [(1, 0)], "k")
    other = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, [(1, 1)], "k")
    both = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, [(1, 0), (1, 1)], "k")
    torch.testing.assert_close(one, both, equal_nan=True)
    torch.testing.assert_close(other, both, equal_nan=True)
    q_one = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, [(1, 0)], "q")
    q_both = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, [(1, 0), (1, 1)], "q")
    assert float((q_one - q_both).nan_to_num().abs().max()) > 1e-5  # queries are per query head


@pytest.mark.parametrize("name", ["ln-standard", "left-padded"])
def test_given_caches_are_used_as_computed_ones(name):
    model = random_model(seed=3, **SWITCHES[name])
    clean, corrupted = _pair(name, model)
    _, cc = store.run_with_cache(model, clean)
    _, kc = store.run_with_cache(model, corrupted)
    given = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, [(1, 2)], "v", cc, kc)
    computed = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, [(1, 2)], "v")
    torch.testing.assert_close(given, computed, equal_nan=True, atol=1e-6, rtol=0)
    with pytest.raises(PathPatchingError, match="cache is of a run on"):
        pp.path_patch_to_logits(model, clean[:1], corrupted[:1], logit_diff, cc, kc)


# ---------------------------------------------------------------------------------------------
# Sanity facts
# ---------------------------------------------------------------------------------------------


def test_last_layer_head_to_logits_is_activation_patching_of_its_z(switched):
    """Nothing after the last layer's heads is frozen differently: their path to the logits is
    TransformerLens's single-head activation patching of hook_z (noising: clean run, z from the
    corrupted run)."""
    name, model = switched
    clean, corrupted = _pair(name, model)
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(corrupted)
        tl = tlp.get_act_patch_attn_head_out_all_pos(model, clean, corrupted_cache, logit_diff)
    ours = pp.path_patch_to_logits(model, clean, corrupted, logit_diff)
    torch.testing.assert_close(ours[-1], tl[-1].float(), atol=ATOL, rtol=0)


def test_identical_prompts_give_the_clean_metric_everywhere():
    model = random_model(seed=5)
    clean = random_tokens(model, batch=2, pos=6, seed=2)
    with torch.no_grad():
        clean_metric = float(logit_diff(model(clean)))
    to_logits = pp.path_patch_to_logits(model, clean, clean.clone(), logit_diff)
    torch.testing.assert_close(to_logits, torch.full_like(to_logits, clean_metric), atol=1e-5, rtol=0)
    to_k = pp.path_patch_to_heads(model, clean, clean.clone(), logit_diff, [(1, 1)], "k")
    assert to_k[1].isnan().all()
    torch.testing.assert_close(to_k[0], torch.full_like(to_k[0], clean_metric), atol=1e-5, rtol=0)


def test_nan_layout_for_receivers_in_later_layers(deep_model):
    model = deep_model
    clean, corrupted = _pair("ln-standard", model, seed=8)
    out = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, [(3, 0), (2, 2)], "q")
    assert out.shape == (4, 4)
    assert not out[:2].isnan().any() and out[2:].isnan().all()
    out = pp.path_patch_to_heads(model, clean, corrupted, logit_diff, (1, 3), "v")  # one pair is accepted
    assert not out[:1].isnan().any() and out[1:].isnan().all()


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors():
    model = random_model(seed=5)
    clean = random_tokens(model, batch=2, pos=6, seed=2)
    bad = [([(0, 1)], "k", "layer 0"), ([(2, 0)], "k", "outside the model's 2 layers"),
           ([(1, 4)], "q", "outside the layer's 4 heads"), ([(-1, 0)], "v", "outside"),
           ([(1, 0)], "z", "Unknown receiver input 'z'"), ([], "q", "at least one receiver"),
           ([(1, 0, 2)], "q", r"\(layer, head\) pair"), (None, "q", "needs receivers")]
    for receivers, input, message in bad:
        with pytest.raises(PathPatchingError, match=message):
            pp.path_patch_to_heads(model, clean, clean, logit_diff, receivers, input)
    assert issubclass(PathPatchingError, ValueError)
    with pytest.raises(PathPatchingError, match="one shape"):
        pp.path_patch_to_logits(model, clean, clean[:, :5], logit_diff)
    with pytest.raises(PathPatchingError, match="one number"):
        pp.path_patch_to_logits(model, clean, clean.flip(0), lambda logits: logits[:, -1, :3].mean(0))
    for switch, message in (({"parallel_attn_mlp": True}, "parallel attention"),):
        other = random_model(seed=5, **switch)
        with pytest.raises(PathPatchingError, match=message):
            pp.path_patch_to_logits(other, clean, clean, logit_diff)
    moe = random_model(seed=5)
    moe.cfg.num_experts = 4  # the check reads the config; no MoE weights are needed to refuse
    with pytest.raises(PathPatchingError, match="mixture-of-experts"):
        pp.path_patch_to_logits(moe, clean, clean, logit_diff)
    task = tasks.Task("pair", "", "logit_diff", clean, clean.flip(0), torch.tensor([ANSWER] * 2),
                      torch.tensor([WRONG] * 2), [], [])
    with pytest.raises(PathPatchingError, match="no receivers"):
        pp.path_patch_task(model, task, receivers=[(1, 0)], input="logits")
    with pytest.raises(PathPatchingError, match="Unknown input"):
        pp.path_patch_task(model, task, receivers=[(1, 0)], input="z")


# ---------------------------------------------------------------------------------------------
# The task API and the zoo induction model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def induction():
    model = load_model("ce-induction-2l")
    return model, tasks.make_task("induction", model, n=4, seed=3)


def test_zoo_induction_model_equals_plain_implementation(induction):
    model, task = induction
    ours = pp.path_patch_to_logits(model, task.clean_tokens, task.corrupted_tokens, task.metric)
    _close(ours, reference(model, task.clean_tokens, task.corrupted_tokens, task.metric))
    for input in ("q", "k", "v"):
        receivers = [(1, 1)] if input == "k" else [(1, 0), (1, 1), (1, 2), (1, 3)]
        ours = pp.path_patch_to_heads(model, task.clean_tokens, task.corrupted_tokens, task.metric, receivers, input)
        _close(ours, reference(model, task.clean_tokens, task.corrupted_tokens, task.metric, receivers, input))


def test_path_patch_task_labels_and_normalises(induction):
    model, task = induction
    st = store.ActivationStore()
    result = pp.path_patch_task(model, task, activation_store=st)
    clean, corrupted = st.get(model, task.clean_tokens), st.get(model, task.corrupted_tokens)
    assert st.misses == 2  # the two runs, read from the store
    norm = tasks.normaliser(task, clean.logits, corrupted.logits)
    assert result.normaliser == norm and norm.meaningful
    raw = pp.path_patch_to_logits(model, task.clean_tokens, task.corrupted_tokens, task.metric, clean.cache,
                                  corrupted.cache)
    torch.testing.assert_close(result.raw, raw)
    torch.testing.assert_close(result.values, norm(raw))
    torch.testing.assert_close(result.effect, norm(raw) - 1.0)
    assert result.baseline == 1.0 and result.input == "logits" and result.receivers == ()
    assert result.labels == (("L0", "L1"), ("H0", "H1", "H2", "H3"))
    assert result.title == "Path patching: each head → logits"
    assert result.metric_label == task.metric_label
    # Induction flows to the logits through the layer-1 induction heads: the largest drop is there.
    drop = -result.effect
    layer, head = divmod(int(drop.argmax()), model.cfg.n_heads)
    assert layer == 1 and float(drop.max()) > 0.2

    to_k = pp.path_patch_task(model, task, receivers=[(1, 1)], input="k", activation_store=st)
    assert st.misses == 2
    assert to_k.title == "Path patching: each head → L1H1.k" and to_k.receivers == ((1, 1),) and to_k.input == "k"
    assert to_k.values[1].isnan().all() and to_k.effect[1].isnan().all()
    torch.testing.assert_close(to_k.values[0], norm(to_k.raw[0]))
    several = pp.path_patch_task(model, task, receivers=[(1, 2), (1, 0)], input="q", activation_store=st)
    assert several.title == "Path patching: each head → L1H0.q, L1H2.q"


def test_task_values_are_changes_from_clean_when_normalising_is_not_meaningful():
    model = random_model(seed=5)
    clean = random_tokens(model, batch=1, pos=6, seed=2)
    corrupted = clean.clone()
    corrupted[0, 2] = random_tokens(model, batch=1, pos=6, seed=9)[0, 2]
    task = tasks.Task("pair", "", "logit_diff", clean, corrupted, torch.tensor([ANSWER]), torch.tensor([WRONG]), [], [])
    st = store.ActivationStore()
    clean_logits = st.get(model, clean).logits
    corrupted_logits = st.get(model, corrupted).logits
    norm = tasks.normaliser(task, clean_logits, corrupted_logits)
    if norm.meaningful:  # one prompt: meaningful whenever the gap is not zero; force the other case
        task.wrongs = task.answers.clone()  # the metric is then 0 everywhere: no gap
        norm = tasks.normaliser(task, clean_logits, corrupted_logits)
    assert not norm.meaningful
    result = pp.path_patch_task(model, task, activation_store=st)
    assert result.baseline == 0.0 and result.value_label.startswith("Δ")
    torch.testing.assert_close(result.values, result.raw - norm.clean)
    torch.testing.assert_close(result.effect, result.values)
