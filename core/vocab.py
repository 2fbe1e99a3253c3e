"""Word-level vocabulary and tokenizer builder of the embedded zoo models.

The zoo models use a small word-level vocabulary of everyday English words so that
prompts typed in the app read like text while staying tiny enough to train on a CPU.
`ce-induction-2l` uses this tokenizer; the task models' (`core.corpus.build_tokenizer`) adds
the task words, names and year pieces to these words.
"""
from __future__ import annotations

from pathlib import Path

BOS = "<|bos|>"
EOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"
SPECIALS = [BOS, EOS, PAD, UNK]

PUNCTUATION = [".", ",", "!", "?", ";", ":", "'", '"', "(", ")", "-", "<", ">", "/", "=", "&"]

# A few hundred common English words (no duplicates; order fixes the token ids).
WORDS = """
the a an and or but if then so because of to in on at by for with from into over under
after before about between through during without within near far up down out off again
i you he she it we they me him her us them my your his its our their this that these those
is are was were be been being am has have had do does did will would can could shall should
may might must not no yes all any some many much more most few less each every other another
one two three four five six seven eight nine ten first second last next new old good bad big
small long short high low great little own same right left early late young hot cold warm
happy sad fast slow red blue green black white yellow brown dark light open full empty
man woman boy girl child people friend king queen teacher doctor farmer student family mother
father sister brother baby name time year day night week morning evening world life hand
eye head face door house home room school city town village country road river sea lake
hill mountain tree forest garden field flower grass water fire air earth sun moon star sky
rain snow wind cloud stone rock sand gold silver iron bread milk cake apple fruit food drink
tea coffee book letter story word page song music game ball box bag cup bottle table chair
bed window wall floor car bus train ship boat bike horse dog cat bird fish cow pig sheep mouse
lion bear wolf fox duck chicken egg key coin ring hat shoe coat shirt dress card map clock
lamp picture paper pen idea plan question answer problem reason way place part thing end
go goes went come came see saw look looked make made take took give gave get got find found
know knew think thought tell told say said ask asked work worked play played run ran walk
walked sit sat stand stood eat ate sleep slept read wrote write sing sang open opened close
closed want wanted like liked love loved help helped keep kept hold held bring brought buy
bought pay paid send sent leave left meet met begin began stop stopped start started live
lived move moved turn turned show showed hear heard call called try tried need needed feel
felt become became put set cut carry carried build built fall fell grow grew draw drew
very too also just only still even never always often sometimes here there now soon today
tomorrow yesterday together away back home where when why how what who which while until
mary john alice bob tom anna james emma david sarah peter lucy paul kate mark jane
""".split()

def vocabulary() -> list[str]:
    """Tokens in id order: specials, punctuation, then words (deduplicated, order kept)."""
    seen: dict[str, None] = {}
    for tok in SPECIALS + PUNCTUATION + WORDS:
        seen.setdefault(tok, None)
    return list(seen)


def build_tokenizer(model_dir: Path | None = None):
    """A lower-casing word-level `PreTrainedTokenizerFast`; saved to `model_dir` if given.

    Built with the `tokenizers` library and wrapped for transformers, so TransformerLens can
    use it as it uses GPT-2's. It does not add BOS itself: TransformerLens prepends it.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        model_max_length=10**6,
    )
    if model_dir is not None:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(model_dir))
    return fast
