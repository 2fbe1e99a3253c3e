"""The zoo language: the task words and templates, and the seeded corpora made from them.

`core.tasks` builds its prompts from the word lists and templates here; the zoo scripts train
the embedded models and SAEs on the corpora; the SAE page's feature index reads `documents`.
Light on purpose: torch is imported only where tensors are made.

The zoo language corpus is seeded, templated English that carries the famous circuits.

Every sentence is made here from word lists and templates; nothing is downloaded. Five kinds
of episode are mixed into training documents:

- **IOI** (indirect object identification): "When Mary and John went to the store, John gave a
  drink to Mary." in both name orders (ABBA, BABA) and several templates;
- **greater-than**: "The war lasted from the year 1732 to the year 1758." where years are a
  century token ("17") and a two-digit continuation token ("##32", shown as "32"), as GPT-2
  splits " 1732" into " 17" + "32";
- **subject-verb agreement** across an attractor, a prepositional phrase ("The keys on the
  cabinet are old.") or a relative clause ("The keys that the man holds are old.");
- **induction**: a chunk of random words repeated later, or a sentence repeated;
- **names**: sentences that copy a name from earlier ("This is Mary. Mary is my friend."),
  over every name, so copying heads learn to move any name;
- **filler** narrative, so the rest reads like a (very plain) language.

A fixed share of the names and one template of each task are **held out**: held-out names
appear only in filler and name-copying sentences (so their embeddings are trained) and never in
a task sentence; held-out templates never appear in training. `core/tasks.py` evaluates on them.

Two more corpora: `induction_batch`, random words with a repeated chunk (what `ce-induction-2l`
is trained on), and `documents(spec, tokenizer)`, the token documents an embedded SAE is
trained on and its feature index reads, named by a small spec.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core import vocab as base_vocab

if TYPE_CHECKING:  # torch loads in seconds: only where tensors are made
    import torch

BOS, EOS, PAD, UNK = base_vocab.BOS, base_vocab.EOS, base_vocab.PAD, base_vocab.UNK
SPECIALS = base_vocab.SPECIALS
PUNCTUATION = base_vocab.PUNCTUATION
SUBWORD_PREFIX = "##"

# Three hundred and more first names, none of them also an ordinary word of the vocabulary.
NAMES = """
aaron abigail adam adrian aidan alan albert alex alexander alfred alice alison amanda amber amy
andrew angela anna anne anthony arthur ashley austin barbara benjamin bernard beth betty brandon
brenda brian bruce bryan caleb carl carlos caroline catherine charles charlie charlotte chloe
chris christian christina christine claire clara colin connor craig cynthia daniel danielle
david deborah dennis derek diana diane donald donna dorothy douglas dylan edward eleanor elijah
elizabeth ellen emily emma eric erica ethan eva evan fiona frances francis frank fred gabriel
gary george gerald gloria gordon greg hannah harold harry heather helen henry howard ian isaac
isabel jack jacob james jane janet jason jeffrey jennifer jeremy jerry jesse jessica joan joe
john jonathan jordan joseph joshua joyce judith julia julian julie justin karen katherine kathy
keith kelly kenneth kevin kyle laura lauren lawrence leah leo leonard linda lisa logan louis
lucas lucy luke lydia madison margaret maria marie martha martin mary matthew megan melissa
michael michelle mike monica nancy naomi nathan neil nicholas nicole noah oliver olivia oscar
owen pamela patricia patrick paul paula peter philip rachel ralph raymond rebecca richard
robert roger ronald ruth ryan samantha samuel sandra sarah scott sean sharon simon sophia
stephen steven susan teresa thomas timothy tony tyler victor victoria vincent walter wayne
william zachary abel ada agnes alma amos andrea arnold astrid barry beatrice boris carmen
cecilia cedric chester clarence clifford cora daisy damian darren dean delia diego dominic
doris edgar edith edwin elaine elena elias eliza elliot elsa emil ernest esther eugene felix
fernando florence floyd gavin gemma gilbert gina glen gregory gustav hector herbert hilda hugo
ida igor irene iris ivan jasper jenny jerome joel jonas josie juan karl kirk lars leon lewis
lionel lois lorenzo lottie luis mabel marcus marta maxine miles milo miriam mona morris nadia
nigel nina norman olga otto pablo percy phoebe quentin rafael rex rita roland rosa rufus sally
sergio sheila silas sonia stanley stella stuart sven tessa thea theo tina tobias ulrich ursula
vera viola wendy wilma xavier yvonne zoe
""".split()

PLACES = """
store school park garden market station beach library church hospital office restaurant cafe
farm forest river lake hill museum theatre bank hotel kitchen village city castle harbour
""".split()

OBJECTS = """
drink book ring pear letter gift key bag hat cup bottle ball pen card map coin flower cake
basket lamp clock box ticket note shirt
""".split()

# Greater-than: what lasts from one year to a later one.
EVENTS = """
war siege voyage journey reign festival drought famine strike trial project treaty expedition
dynasty campaign crisis plague revolution empire alliance
""".split()
CENTURIES = [str(c) for c in range(11, 20)]
TWO_DIGITS = [f"{y:02d}" for y in range(100)]

# Subject-verb agreement: (singular, plural) nouns; animate ones can hold, see, want things.
THINGS = [
    ("key", "keys"), ("book", "books"), ("box", "boxes"), ("car", "cars"), ("tree", "trees"),
    ("house", "houses"), ("cup", "cups"), ("bottle", "bottles"), ("chair", "chairs"),
    ("table", "tables"), ("window", "windows"), ("door", "doors"), ("flower", "flowers"),
    ("apple", "apples"), ("letter", "letters"), ("picture", "pictures"), ("lamp", "lamps"),
    ("clock", "clocks"), ("ship", "ships"), ("boat", "boats"), ("bag", "bags"), ("ring", "rings"),
    ("coin", "coins"), ("hat", "hats"), ("shoe", "shoes"), ("coat", "coats"), ("card", "cards"),
    ("map", "maps"), ("pen", "pens"), ("song", "songs"), ("game", "games"), ("ball", "balls"),
    ("cake", "cakes"), ("egg", "eggs"), ("stone", "stones"), ("road", "roads"), ("cabinet", "cabinets"),
    ("basket", "baskets"), ("ticket", "tickets"), ("shirt", "shirts"),
]
BEINGS = [
    ("man", "men"), ("woman", "women"), ("boy", "boys"), ("girl", "girls"), ("child", "children"),
    ("teacher", "teachers"), ("doctor", "doctors"), ("farmer", "farmers"), ("student", "students"),
    ("friend", "friends"), ("king", "kings"), ("queen", "queens"), ("dog", "dogs"), ("cat", "cats"),
    ("bird", "birds"), ("horse", "horses"), ("lion", "lions"), ("bear", "bears"), ("wolf", "wolves"),
    ("fox", "foxes"), ("mouse", "mice"), ("neighbour", "neighbours"), ("pilot", "pilots"),
]
PEOPLE = BEINGS[:12] + BEINGS[21:]
# (third person singular, plural) verbs for relative clauses: "the keys that the man holds".
VERBS = [
    ("holds", "hold"), ("likes", "like"), ("sees", "see"), ("finds", "find"), ("wants", "want"),
    ("keeps", "keep"), ("needs", "need"), ("loves", "love"), ("brings", "bring"), ("buys", "buy"),
    ("makes", "make"), ("paints", "paint"),
]
PREPOSITIONS = ["on", "near", "behind", "under", "in", "by", "with", "beside", "above", "of"]
ADJECTIVES = """
old new big small red blue green black white brown dark light open full empty long short
heavy clean dirty broken strange lovely quiet loud warm cold
""".split()
TIMES = ["morning", "evening", "night", "day", "week", "year"]
PRONOUNS = ["he", "she", "they"]

# Ordinary words the filler templates use that are not in the lists above.
FILLER_WORDS = """
the a an and or but then so because to in at for from into after before when while where it
was were is are be had has liked saw went walked ran found bought gave told said wanted kept
took made met played read wrote sang asked called helped lived moved stayed came home back
again today there here very too also all some many every never always often sometimes
friends happy sad tired busy late early game story about hello each other long day later year
born lasted started ended ran until war that which who did not what how
""".split()


@dataclass(frozen=True)
class Template:
    name: str
    text: str  # str.format text; the prompt ends where "{answer}" starts
    held_out: bool = False
    # Held-out templates count towards a model's required metrics, except stress tests
    # (headline=False), which are measured and reported beside them.
    headline: bool = True


# IOI: {io} is the indirect object (the answer), {s} the subject, named twice.
IOI_TEMPLATES = [
    Template("when_went", "When {a} and {b} went to the {place}, {s} gave a {obj} to {answer}."),
    Template("when_got", "When {a} and {b} got a {obj} at the {place}, {s} decided to give it to {answer}."),
    Template("after_went", "After {a} and {b} went to the {place}, {s} gave a {obj} to {answer}."),
    Template("then_working", "Then, {a} and {b} were working at the {place}. {s} decided to give a {obj} to {answer}."),
    Template("while_at", "While {a} and {b} were at the {place}, {s} handed a {obj} to {answer}."),
    Template("long_day", "{a} and {b} had a long day at the {place}. {s} gave a {obj} to {answer}."),
    Template("friends_found", "Friends {a} and {b} found a {obj} at the {place}. {s} gave the {obj} to {answer}.", held_out=True),
    Template("friends_gave_it", "Friends {a} and {b} found a {obj} at the {place}. {s} gave it to {answer}.",
             held_out=True, headline=False),
]

# Greater-than: the answer is a two-digit token above {yy}, in the same century.
GT_TEMPLATES = [
    Template("lasted_year", "The {event} lasted from the year {cc}{yy} to the year {cc}{answer}."),
    Template("started_ended", "The {event} started in the year {cc}{yy} and ended in the year {cc}{answer}."),
    Template("lasted_short", "The {event} lasted from {cc}{yy} to {cc}{answer}."),
    Template("began_over", "The {event} began in {cc}{yy} and was over by {cc}{answer}."),
    Template("ran_until", "The {event} ran from the year {cc}{yy} until the year {cc}{answer}.", held_out=True),
]

# Agreement: {subj} (singular or plural) takes "is"/"are" after an attractor.
SVA_TEMPLATES = [
    Template("prep_on", "The {subj} on the {attr} {answer} {adj}."),
    Template("prep_near", "The {subj} near the {attr} {answer} {adj}."),
    Template("prep_behind", "The {subj} behind the {attr} {answer} {adj}."),
    Template("prep_of", "The {subj} of the {attr} {answer} {adj}."),
    Template("rel_that", "The {subj} that the {agent} {verb} {answer} {adj}."),
    Template("rel_that_here", "The {subj} that the {agent} {verb} here {answer} {adj}."),
    Template("prep_beside", "The {subj} beside the {attr} {answer} {adj}.", held_out=True),
    Template("rel_which", "The {subj} which the {agent} {verb} {answer} {adj}.", held_out=True),
]

FILLER_TEMPLATES = [
    "{n} went to the {place}.",
    "{n} walked to the {place} with {m}.",
    "{n} saw a {adj} {thing} near the {place}.",
    "{n} and {m} were friends.",
    "{n} liked the {place} very much.",
    "{n} was {mood} today.",
    "{n} found a {obj} at the {place}.",
    "{n} lived in the {place} for a long time.",
    "It was a {adj} {time}.",
    "{pron} went home after the {time}.",
    "The {thing} was {adj}.",
    "The {things} were {adj}.",
    "The {thing} is {adj}.",
    "The {things} are {adj}.",
    "The {being} was {mood}.",
    "The {beings} were {mood}.",
    "{n} was born in the year {cc}{yy}.",
    "In {cc}{yy}, {n} moved to the {place}.",
    "{n} read a story about a {thing}.",
    "{n} called {m} in the {time}.",
    "{n} and {m} played a game at the {place}.",
    "{n} sat beside {m} at the {place}.",
    "The {thing} which {n} found was {adj}.",
    "{n} waited at the {place} until the {time}.",
    "{n} ran from the {place} to the {place2}.",
]
MOODS = ["happy", "sad", "tired", "busy", "late", "early"]

# Sentences that copy a name from earlier in the context, over every name (held-out ones too),
# so that any name is one a copying head can move. None has the IOI shape (two names, then the
# one that was not repeated).
COPY_TEMPLATES = [
    "{n} had a {obj}. {n} liked it.",
    "{n} went to the {place}. Later, {n} went home.",
    "This is {n}. {n} is my friend.",
    "{n} was tired, so {n} went to sleep.",
    "{n} saw {m} at the {place}. {m} was {mood}.",
    "{n} bought a {obj}, and {n} kept it.",
]


def split_names(seed: int = 0, held_out_share: float = 0.2) -> tuple[list[str], list[str]]:
    """(training names, held-out names): a fixed seeded split of NAMES."""
    names = sorted(set(NAMES))
    random.Random(seed).shuffle(names)
    k = int(len(names) * held_out_share)
    return sorted(names[k:]), sorted(names[:k])


def vocabulary() -> list[str]:
    """Tokens in id order: specials, punctuation, centuries, two-digit continuations, words, names."""
    words: list[str] = []
    words += [w for pair in THINGS + BEINGS + VERBS for w in pair]
    words += PLACES + OBJECTS + EVENTS + PREPOSITIONS + ADJECTIVES + TIMES + PRONOUNS + MOODS + FILLER_WORDS
    words += base_vocab.WORDS  # everyday words, so typed prompts mostly tokenize
    for t in IOI_TEMPLATES + GT_TEMPLATES + SVA_TEMPLATES:
        words += _template_words(t.text)
    for t in FILLER_TEMPLATES:
        words += _template_words(t)
    seen: dict[str, None] = {}
    for tok in SPECIALS + PUNCTUATION + CENTURIES + [SUBWORD_PREFIX + d for d in TWO_DIGITS]:
        seen.setdefault(tok, None)
    for w in sorted(set(words) - set(NAMES)):
        seen.setdefault(w, None)
    for name in sorted(set(NAMES)):
        seen.setdefault(name, None)
    return list(seen)


def _template_words(text: str) -> list[str]:
    import re

    plain = re.sub(r"\{[a-z_]+\}", " ", text).lower()
    return [w for w in re.findall(r"[a-z]+", plain)]


def build_tokenizer(model_dir: Path | None = None, name_or_path: str | None = None):
    """A lower-casing word-level tokenizer; four-digit years split as GPT-2 splits them.

    WordPiece over whole words: a word in the vocabulary is one token, "1732" (not in it) is
    the century "17" plus the continuation "##32". The decoder joins continuations without a
    space and shows a lone continuation as "32". TransformerLens prepends BOS itself.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=SUBWORD_PREFIX))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix=SUBWORD_PREFIX, cleanup=False), decoders.Replace(SUBWORD_PREFIX, "")]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        add_bos_token=True, model_max_length=10**6,
    )
    if name_or_path is not None:
        fast.name_or_path = name_or_path
    if model_dir is not None:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(model_dir))
    return fast


# ---------------------------------------------------------------------------------------------
# Episodes
# ---------------------------------------------------------------------------------------------


def capitalised(word: str) -> str:
    return word[:1].upper() + word[1:]


def ioi_fields(rng: random.Random, names: list[str]) -> dict:
    """Slot values of one IOI sentence, in a random order: ABBA (IO named first) or BABA."""
    io, s = rng.sample(names, 2)
    order = rng.choice(["ABBA", "BABA"])
    a, b = (io, s) if order == "ABBA" else (s, io)
    return dict(a=capitalised(a), b=capitalised(b), s=capitalised(s), answer=capitalised(io),
                place=rng.choice(PLACES), obj=rng.choice(OBJECTS))


def gt_fields(rng: random.Random) -> dict:
    """Slot values of one greater-than sentence: start year yy in 2..97, end year above it."""
    yy = rng.randint(2, 97)
    end = rng.randint(yy + 1, 99)
    return dict(event=rng.choice(EVENTS), cc=rng.choice(CENTURIES[:-1]), yy=f"{yy:02d}", answer=f"{end:02d}")


def sva_fields(rng: random.Random) -> dict:
    """Slot values of one agreement sentence; the attractor's number is independent of the subject's."""
    plural = rng.random() < 0.5
    attractor_plural = rng.random() < 0.5
    subj = rng.choice(THINGS)[plural]
    attr = rng.choice(THINGS + BEINGS)
    agent = rng.choice(PEOPLE)
    verb = rng.choice(VERBS)
    while attr[0] == subj or attr[1] == subj:
        attr = rng.choice(THINGS + BEINGS)
    return dict(
        subj=subj, attr=attr[attractor_plural], agent=agent[attractor_plural], verb=verb[attractor_plural],
        answer="are" if plural else "is", adj=rng.choice(ADJECTIVES),
    )


def _filler(rng: random.Random, names: list[str], templates: list[str] = FILLER_TEMPLATES) -> str:
    n, m = rng.sample(names, 2)
    thing, being = rng.choice(THINGS), rng.choice(BEINGS)
    return rng.choice(templates).format(
        n=capitalised(n), m=capitalised(m), place=rng.choice(PLACES), place2=rng.choice(PLACES), adj=rng.choice(ADJECTIVES), thing=thing[0],
        things=thing[1], being=being[0], beings=being[1], obj=rng.choice(OBJECTS), mood=rng.choice(MOODS),
        time=rng.choice(TIMES), pron=capitalised(rng.choice(PRONOUNS)), cc=rng.choice(CENTURIES),
        yy=f"{rng.randint(0, 99):02d}",
    )


@dataclass
class CorpusConfig:
    """Shares of each episode kind in training documents (they need not sum to 1)."""

    ioi: float = 0.30
    greater_than: float = 0.18
    sva: float = 0.12
    induction: float = 0.13
    filler: float = 0.15
    names: float = 0.12
    max_repeat: int = 24  # longest repeated random chunk
    episodes_per_document: tuple = (0.7, 0.2, 0.1)  # shares of documents with 1, 2, 3 episodes
    split_seed: int = 0


class Corpus:
    """Draws training documents (token ids) from a seeded `random.Random`."""

    def __init__(self, tokenizer, cfg: CorpusConfig | None = None):
        self.tok = tokenizer
        self.cfg = cfg or CorpusConfig()
        self.train_names, self.held_out_names = split_names(self.cfg.split_seed)
        self.all_names = self.train_names + self.held_out_names
        self.kinds = ["ioi", "greater_than", "sva", "induction", "filler", "names"]
        self.weights = [getattr(self.cfg, k) for k in self.kinds]
        special = set(tokenizer.all_special_ids)
        self.random_ids = [i for i in range(len(tokenizer)) if i not in special]
        self._templates = {
            "ioi": [t for t in IOI_TEMPLATES if not t.held_out],
            "greater_than": [t for t in GT_TEMPLATES if not t.held_out],
            "sva": [t for t in SVA_TEMPLATES if not t.held_out],
        }

    def episode_text(self, rng: random.Random, kind: str) -> str:
        if kind == "ioi":
            return rng.choice(self._templates["ioi"]).text.format(**ioi_fields(rng, self.train_names))
        if kind == "greater_than":
            return rng.choice(self._templates["greater_than"]).text.format(**gt_fields(rng))
        if kind == "sva":
            return rng.choice(self._templates["sva"]).text.format(**sva_fields(rng))
        if kind == "names":
            return _filler(rng, self.all_names, COPY_TEMPLATES)
        return _filler(rng, self.all_names)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def document(self, rng: random.Random, max_len: int) -> list[int]:
        """Token ids of one short document (no BOS): 1 to 3 episodes, cut at `max_len`."""
        n = rng.choices([1, 2, 3], self.cfg.episodes_per_document)[0]
        kinds = rng.choices(self.kinds, self.weights, k=n)
        encoded = iter(self._encode([self.episode_text(rng, k) for k in kinds if k != "induction"]))
        ids: list[int] = []
        for kind in kinds:
            ids += self._induction(rng, ids) if kind == "induction" else next(encoded)
        return ids[:max_len]

    def _induction(self, rng: random.Random, so_far: list[int]) -> list[int]:
        """A chunk of random tokens, some filler, and the chunk again; or an earlier stretch again."""
        if so_far and rng.random() < 0.3:
            k = rng.randint(3, min(20, len(so_far)))
            start = rng.randint(0, len(so_far) - k)
            return so_far[start : start + k]
        k = rng.randint(3, self.cfg.max_repeat)
        chunk = rng.choices(self.random_ids, k=k)
        gap = self._encode([_filler(rng, self.all_names) for _ in range(rng.randint(0, 2))]) if rng.random() < 0.5 else []
        return chunk + [t for g in gap for t in g] + chunk

    def batches(self, rng: random.Random, batch: int, n_ctx: int, n_batches: int = 4) -> list[torch.Tensor]:
        """`n_batches` batches of BOS-initial documents, bucketed by length and right-padded with PAD.

        Documents of similar length share a batch, so little compute goes to padding; the
        training loss ignores PAD targets, and causal attention never lets a real token see one.
        """
        import torch

        bos, pad = self.tok.bos_token_id, self.tok.pad_token_id
        docs = sorted(([bos] + self.document(rng, n_ctx - 1) for _ in range(batch * n_batches)), key=len)
        out = []
        for i in range(n_batches):
            chunk = docs[i * batch : (i + 1) * batch]
            width = max(len(d) for d in chunk)
            out.append(torch.tensor([d + [pad] * (width - len(d)) for d in chunk]))
        rng.shuffle(out)
        return out


# ---------------------------------------------------------------------------------------------
# Random words with a repeated chunk, and the SAE corpora
# ---------------------------------------------------------------------------------------------


def induction_batch(gen: torch.Generator, words: torch.Tensor, bos_id: int, batch: int, n_ctx: int,
                    min_len: int = 16, repeat_prob: float = 0.8, max_pad: int = 6) -> torch.Tensor:
    """[batch, 1 + length] tokens: BOS, then random `words` (token ids); `length` is drawn from
    [min_len, n_ctx) once per batch.

    In a `repeat_prob` share of the sequences a chunk of random words is repeated once:
    a random prefix (0..max_pad words), the chunk, a random gap (0..max_pad), the chunk again,
    a random tail (0..max_pad). The chunk length (about half the sequence) and both offsets
    therefore vary from sequence to sequence, so no fixed position or shift predicts the copy.
    The other sequences are random words throughout. Every draw comes from `gen`, in a fixed
    order: the embedded model and SAEs were made from these exact sequences.
    """
    import torch

    length = int(torch.randint(min_len, n_ctx, (1,), generator=gen))  # tokens after BOS
    toks = words[torch.randint(0, len(words), (batch, length), generator=gen)]
    for b in range(batch):
        if torch.rand(1, generator=gen).item() > repeat_prob:
            continue
        prefix, gap, tail = (int(x) for x in torch.randint(0, max_pad + 1, (3,), generator=gen))
        k = (length - prefix - gap - tail) // 2
        second = prefix + k + gap
        toks[b, second : second + k] = toks[b, prefix : prefix + k]
    bos = torch.full((batch, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, toks], dim=1)


def documents(spec: dict, tokenizer) -> list[list[int]]:
    """Token ids of `spec["documents"]` BOS-initial documents of at most `spec["max_len"]` tokens.

    The corpus of an embedded SAE, named by a small spec kept in its `metrics.json`, so the page,
    the tests and the training script regenerate exactly the same documents:

        {"kind": "zoo-lm", "seed": 7, "documents": 3000, "max_len": 64}

    - `zoo-lm`: documents of the zoo language corpus (`Corpus`), as the task models saw them;
    - `induction`: random-word sequences with a repeated chunk (`induction_batch`), as
      `ce-induction-2l` saw them.
    """
    kind, seed, n, max_len = spec["kind"], int(spec["seed"]), int(spec["documents"]), int(spec["max_len"])
    bos = tokenizer.bos_token_id
    if kind == "zoo-lm":
        corpus = Corpus(tokenizer)
        rng = random.Random(seed)
        return [[bos] + corpus.document(rng, max_len - 1) for _ in range(n)]
    if kind == "induction":
        import torch

        special = set(tokenizer.all_special_ids)
        words = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
        gen = torch.Generator().manual_seed(seed)
        return [induction_batch(gen, words, bos, batch=1, n_ctx=max_len, min_len=min(16, max_len - 1))[0].tolist()
                for _ in range(n)]
    raise ValueError(f"Unknown corpus kind {kind!r}: expected 'zoo-lm' or 'induction'.")
