"""core/tasks.py: prompt construction, metrics against hand computations, custom-task validation."""
import re

import pytest
import torch

from core import corpus, tasks


@pytest.fixture(scope="module")
def lm():
    from core.models import load_model

    return load_model("ce-circuits-3l-attn")


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_ioi_prompts_are_abba_and_baba_with_abc_corruption(lm):
    task = tasks.make_task("ioi", lm, n=8, seed=3)
    _, held_out = corpus.split_names()
    tok = lm.tokenizer
    assert task.template == "friends_found" and len(task) == 8
    assert task.clean_tokens.shape == task.corrupted_tokens.shape
    for i, (row, bad) in enumerate(zip(task.clean_tokens, task.corrupted_tokens)):
        io, s = int(task.answers[i]), int(task.wrongs[i])
        assert tok.decode([io]) in held_out and tok.decode([s]) in held_out
        assert (row == io).sum() == 1 and (row == s).sum() == 2
        first_name = row[(row == io) | (row == s)][0]
        assert int(first_name) == (io if i % 2 == 0 else s)  # ABBA, then BABA
        diff = (row != bad).nonzero().flatten().tolist()
        s2 = (row == s).nonzero().flatten().tolist()[-1]
        assert diff == [s2]  # ABC: only the second S changes, to a third name
        assert int(bad[s2]) not in (io, s)
        assert row[-1] == tok.convert_tokens_to_ids("to")


def test_logit_diff_metric_equals_hand_computation(lm):
    for name in ("ioi", "sva", "induction"):
        task = tasks.make_task(name, lm, n=6, seed=1)
        logits = _logits(lm, task.clean_tokens)
        hand = [float(logits[b, -1, task.answers[b]] - logits[b, -1, task.wrongs[b]]) for b in range(6)]
        assert task.per_prompt(logits).tolist() == pytest.approx(hand, abs=1e-5)
        assert float(task.metric(logits)) == pytest.approx(sum(hand) / 6, abs=1e-5)
        assert task.accuracy(logits) == pytest.approx(sum(h > 0 for h in hand) / 6)


def test_greater_than_probability_difference_by_hand(lm):
    task = tasks.make_task("greater_than", lm, n=5, seed=2)
    logits = _logits(lm, task.clean_tokens)
    vocab = lm.tokenizer.get_vocab()
    year_id = [vocab[f"##{y:02d}"] for y in range(100)]
    for b, start in enumerate(task.info["start_years"]):
        assert task.clean_prompts[b].endswith(f"{start:02d} until the year {task.clean_prompts[b].split()[-1]}")
        probs = torch.softmax(logits[b, -1].double(), -1)
        above = sum(float(probs[year_id[y]]) for y in range(start + 1, 100))
        below = sum(float(probs[year_id[y]]) for y in range(start))
        assert float(task.per_prompt(logits)[b]) == pytest.approx(above - below, abs=1e-5)
    for clean, bad in zip(task.clean_prompts, task.corrupted_prompts):
        century = clean.split()[-1]
        assert re.sub(r"year \d\d\d\d until", f"year {century}01 until", clean) == bad


def test_normalised_metric_is_one_clean_and_zero_corrupted(lm):
    task = tasks.make_task("ioi", lm, n=8)
    base = tasks.baselines(lm, task)
    clean = task.metric(_logits(lm, task.clean_tokens))
    corrupted = task.metric(_logits(lm, task.corrupted_tokens))
    assert float(tasks.normalised(clean, base.clean, base.corrupted)) == pytest.approx(1.0)
    assert float(tasks.normalised(corrupted, base.clean, base.corrupted)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(tasks.TaskError, match="same"):
        tasks.normalised(1.0, 2.0, 2.0)


def test_sva_corruption_flips_the_subject_number_only(lm):
    task = tasks.make_task("sva", lm, n=4, template="rel_which")
    vocab = lm.tokenizer.get_vocab()
    for i, (clean, bad) in enumerate(zip(task.clean_prompts, task.corrupted_prompts)):
        c, k = clean.lower().split(), bad.lower().split()
        assert [j for j in range(len(c)) if c[j] != k[j]] == [1]
        plural = i % 2 == 0
        assert int(task.answers[i]) == vocab["are" if plural else "is"]
        assert c[2] == "which"


def test_held_out_templates_and_names_never_appear_in_training_text():
    tok = corpus.build_tokenizer()
    cor = corpus.Corpus(tok)
    import random

    rng = random.Random(0)
    held_out_names = set(cor.held_out_names)
    for kind, templates in (("ioi", corpus.IOI_TEMPLATES), ("greater_than", corpus.GT_TEMPLATES), ("sva", corpus.SVA_TEMPLATES)):
        patterns = [re.compile(re.sub(r"\\\{[a-z]+\\\}", r"\\w+", re.escape(t.text.split("{answer}")[0]))) for t in templates if t.held_out]
        assert patterns
        for _ in range(1500):
            text = cor.episode_text(rng, kind)
            assert not any(p.search(text) for p in patterns), text
            if kind == "ioi":
                assert not {w.strip(".,").lower() for w in text.split()} & held_out_names, text


def test_every_word_of_a_held_out_template_is_trained_elsewhere():
    """Held out means an unseen sentence shape, not unseen words (an untrained embedding is noise)."""
    import random

    tok = corpus.build_tokenizer()
    cor = corpus.Corpus(tok)
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        seen |= set(tok.convert_ids_to_tokens(cor.document(rng, 128)))
    for t in corpus.IOI_TEMPLATES + corpus.GT_TEMPLATES + corpus.SVA_TEMPLATES:
        if t.held_out:
            words = set(tok.tokenize(re.sub(r"\{[a-z]+\}", " ", t.text)))
            assert words <= seen, (t.name, words - seen)


def test_zoo_tokenizer_splits_years_like_gpt2():
    tok = corpus.build_tokenizer()
    assert tok.tokenize("the year 1732 .") == ["the", "year", "17", "##32", "."]
    ids = tok("the year 1732", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "the year 1732"
    assert tok.decode(ids[-1:]) == "32"
    assert len(corpus.vocabulary()) == len(set(corpus.vocabulary()))
    assert len(corpus.NAMES) == len(set(corpus.NAMES)) >= 300


def test_corpus_batches_are_seeded_and_known_words_only():
    import random

    tok = corpus.build_tokenizer()
    cor = corpus.Corpus(tok)
    a = cor.batches(random.Random(5), 8, 96)
    b = cor.batches(random.Random(5), 8, 96)
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))
    for x in a:
        assert x.shape[0] == 8 and x.shape[1] <= 96
        assert (x[:, 0] == tok.bos_token_id).all()
        assert not (x == tok.unk_token_id).any()
        # right padding only: once a row has PAD, the rest of it is PAD
        is_pad = (x == tok.pad_token_id).int()
        assert torch.equal(is_pad, is_pad.cummax(dim=1).values)
        assert (is_pad[:, 0] == 0).all() and not is_pad.all(dim=0).any()


@pytest.mark.parametrize(
    "args, message",
    [
        (("", "x", "mary", "john"), "clean prompt is empty"),
        (("when mary and john went", "   ", "mary", "john"), "corrupted prompt is empty"),
        (("when mary and john", "when mary and tom", "", "john"), "answer is empty"),
        (("when mary and john", "when mary and tom", "mary", "mary"), "same token"),
        (("when mary and john", "when mary", "mary", "john"), "same length"),
        (("when mary and john", "when mary and tom", "mary john", "john"), r"2 tokens \(.*'mary'.*'john'\).*first token"),
        (("when mary and john", "when mary and tom", "mary", "zzzq"), "wrong answer 'zzzq' is not in this model's vocabulary"),
    ],
)
def test_custom_task_is_validated_with_clear_messages(lm, args, message):
    with pytest.raises(tasks.TaskError, match=message):
        tasks.custom_task(lm, *args)


def test_custom_task_metric_equals_hand_computation(lm):
    task = tasks.custom_task(lm, "When Mary and John went to the store, John gave a drink to",
                             "When Mary and John went to the store, Tom gave a drink to", "Mary", "John")
    logits = _logits(lm, task.clean_tokens)
    vocab = lm.tokenizer.get_vocab()
    assert float(task.metric(logits)) == pytest.approx(float(logits[0, -1, vocab["mary"]] - logits[0, -1, vocab["john"]]))
    assert task.clean_tokens.shape == (1, 15) and task.answers.tolist() == [vocab["mary"]]


def test_task_errors_for_bad_requests(lm):
    with pytest.raises(tasks.TaskError, match="Unknown task"):
        tasks.make_task("ioi2", lm)
    with pytest.raises(tasks.TaskError, match="Unknown template"):
        tasks.make_task("ioi", lm, template="nope")
    with pytest.raises(tasks.TaskError, match="split"):
        tasks.make_task("sva", lm, split="test")
    with pytest.raises(tasks.TaskError, match="out of range"):
        tasks.make_task("sva", lm, n=0)


def test_tasks_on_a_model_whose_tokenizer_cannot_build_them(zoo_model):
    """The induction model has no years in its vocabulary: greater-than says so; induction works."""
    assert len(tasks.make_task("induction", zoo_model, n=4)) == 4
    with pytest.raises(tasks.TaskError, match="no single-token events"):
        tasks.make_task("greater_than", zoo_model, n=4, split="train")


@pytest.fixture(scope="module")
def gpt2_like(tmp_path_factory):
    """A random model with a GPT-2-style byte-level BPE tokenizer ("Ġ" spaces, " 17" + "32" years).

    GPT-2's own tokenizer cannot be downloaded here; this one is trained on the zoo corpus with
    the same conventions, so the task builders are tested on a tokenizer that is not the zoo's.
    """
    import random

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    cor = corpus.Corpus(corpus.build_tokenizer())
    texts = [cor.episode_text(rng, rng.choice(["ioi", "greater_than", "sva", "filler"])) for _ in range(20000)]
    for t in corpus.IOI_TEMPLATES + corpus.GT_TEMPLATES + corpus.SVA_TEMPLATES:
        texts += [re.sub(r"\{[a-z]+\}", "", t.text)] * 20
    texts += [f"{corpus.capitalised(n)} went home." for n in corpus.NAMES for _ in range(3)]
    texts += [f"In the year 17{y:02d}." for y in range(100) for _ in range(40)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(" ?\\d\\d"), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("gpt2_like")
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)  # TransformerLens re-loads a tokenizer by its name_or_path
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=64, d_vocab=len(tok),
                                  attn_only=True, seed=0, default_prepend_bos=True)
    return HookedTransformer(cfg, tokenizer=tok)


def test_tasks_on_a_gpt2_style_tokenizer(gpt2_like):
    tok = gpt2_like.tokenizer
    ioi = tasks.make_task("ioi", gpt2_like, n=6, split="train", template="when_went")
    assert ioi.clean_prompts[0].startswith("When ") and ioi.clean_prompts[0].endswith(" gave a " + ioi.clean_prompts[0].split()[-2] + " to")
    assert all(tok.decode([int(a)]).startswith(" ") and tok.decode([int(a)])[1].isupper() for a in ioi.answers)
    assert tok.decode([int(ioi.answers[0])]).strip() == ioi.clean_prompts[0].split()[1]  # ABBA: IO first
    gt = tasks.make_task("greater_than", gpt2_like, n=4, split="train", template="lasted_year")
    assert tok.convert_ids_to_tokens(int(gt.clean_tokens[0, -1])).startswith("Ġ")  # " 17"
    years = gt.answer_sets[0].nonzero().flatten()
    assert sorted(tok.decode([int(i)]) for i in years) == [f"{y:02d}" for y in range(gt.info["start_years"][0] + 1, 100)]
    sva = tasks.make_task("sva", gpt2_like, n=4, template="rel_that")
    assert [tok.decode([int(a)]) for a in sva.answers] == [" are", " is", " are", " is"]
    assert len(tasks.make_task("induction", gpt2_like, n=4, length=10)) == 4
    custom = tasks.custom_task(gpt2_like, "When Mary and John went to the store, John gave a drink to",
                               "When Mary and John went to the store, Oscar gave a drink to", "Mary", "John")
    assert tok.decode([int(custom.answers[0])]) == " Mary"
    with pytest.raises(tasks.TaskError, match="same length"):
        tasks.custom_task(gpt2_like, "When Mary went", "When Maryanne-Louise went", "Mary", "John")
