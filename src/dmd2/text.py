"""The CLIP tokenizer, built offline from the BPE vocabulary that open_clip ships.

Stable Diffusion's tokenizers are CLIP's byte-level BPE. The hub copies (`openai/clip-vit-large-patch14`, the tiny
test ones) are unreachable offline, but `open_clip/bpe_simple_vocab_16e6.txt.gz` holds the same merges. CLIP's
vocabulary is derived from them: the 256 byte symbols, the same with the end-of-word marker `</w>`, one token per
merge (its pair joined), then the start and end tokens, 49,408 in all. `write_clip_bpe_files` writes them as
`vocab.json` + `merges.txt`, which `transformers.CLIPTokenizer` loads like a hub tokenizer; a tiny text model keeps
only the first merges so that every id fits its embedding table.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from dmd2.errors import MissingInputError

START, END = "<|startoftext|>", "<|endoftext|>"
FULL_VOCAB_SIZE = 49_408
BYTE_SYMBOLS = 256
MAX_LENGTH = 77  # CLIP's context length: every Stable Diffusion text encoder reads 77 tokens


def byte_symbols() -> list[str]:
    """The printable stand-in for each of the 256 bytes, in vocabulary order (GPT-2's byte-level BPE table):
    printable Latin-1 bytes stand for themselves, the others are shifted past 255 so none is whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i in range(256 - len(printable))]  # the other bytes, in byte order
    return [chr(c) for c in printable + shifted]


def open_clip_merges() -> list[tuple[str, str]]:
    """CLIP's 48,894 BPE merges, from the file inside the installed open_clip package."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise MissingInputError(f"{path} not found: the CLIP tokenizer is built from the BPE file open_clip ships; "
                                "reinstall open-clip-torch (make env)")
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    count = FULL_VOCAB_SIZE - 2 * BYTE_SYMBOLS - 2
    return [tuple(line.split()) for line in lines[1 : count + 1]]  # line 0 is the "#version" header


def write_clip_bpe_files(directory: str | Path, vocab_size: int = FULL_VOCAB_SIZE) -> Path:
    """`vocab.json` and `merges.txt` for `CLIPTokenizer` in `directory`. With `vocab_size` below CLIP's 49,408
    (a tiny test text model), only the first merges are kept and the start/end tokens take the last two ids."""
    merges_needed = vocab_size - 2 * BYTE_SYMBOLS - 2
    if merges_needed < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small: the 512 byte tokens and 2 special tokens need 514")
    merges = open_clip_merges()[:merges_needed]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [START, END]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory


def clip_tokenizer(directory: str | Path, vocab_size: int = FULL_VOCAB_SIZE, pad_token: str = END):
    """A `CLIPTokenizer` (77 tokens) from the files `write_clip_bpe_files` writes into `directory`, which are
    written first if missing. Stable Diffusion pads with the end token; SDXL's second tokenizer pads with "!"."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    if not (directory / "vocab.json").exists() or not (directory / "merges.txt").exists():
        write_clip_bpe_files(directory, vocab_size)
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=MAX_LENGTH,
                         pad_token=pad_token)


# -------------------------------------------------------------------------------------------- a tiny T5 tokenizer

T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
_T5_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def t5_tokenizer(vocab_size: int = 1000, model_max_length: int = 512):
    """A T5-shaped tokenizer (SentencePiece's unigram model over "▁"-marked pieces, lower-cased, `</s>` after every
    text, `<pad>` = 0) with a vocabulary made here, for the tiny SD3- and Flux-shaped test pipelines only: T5's own
    SentencePiece file is not reachable offline. Its pieces are CLIP's most frequent whole words (the order of
    open_clip's BPE merges), each single character with and without the word marker, and the three special tokens;
    scores favour whole words, so a known word is one token and any other spells out. Built, not trained: the same
    vocabulary on every machine. Real pipelines bring their own tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    characters = list(_T5_CHARACTERS)
    room = vocab_size - len(T5_SPECIAL) - 1 - 2 * len(characters)
    if room < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small: the special and character pieces need "
                         f"{vocab_size - room}")
    words: list[str] = []
    for pair in open_clip_merges():
        token = "".join(pair)
        if len(words) == room:
            break
        if token.endswith("</w>") and token[:-4].isascii() and token[:-4].isalpha() and len(token) > 5:
            words.append(token[:-4])  # a whole word of two letters or more
    pieces = ([(token, 0.0) for token in T5_SPECIAL] + [("▁", -5.0)] + [("▁" + c, -8.0) for c in characters]
              + [(c, -9.0) for c in characters] + [("▁" + w, -1.0 - i / max(len(words), 1)) for i, w in enumerate(words)])
    model = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIAL.index("<unk>"), byte_fallback=False))
    model.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", T5_SPECIAL.index("</s>"))])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=model_max_length)
