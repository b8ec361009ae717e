"""The SpeechGPT vocabulary: a base LLM tokenizer's ids kept exactly, then K units and the SpeechGPT tokens.

Layout (DESIGN.md): base tokens (LLaMA sentencepiece: unk=0, bos=1, eos=2), then `<0>` … `<K-1>`, `<sosp>`,
`<eosp>`, `[Human]`, `[SpeechGPT]`, `<eoh>`, `<eos>`. A tokenizer that already carries these tokens (the
released SpeechGPT-7B-ma/-cm) keeps its own ids. The vocabulary travels as one JSON file (`vocab.json`, with
the base tokenizer model embedded) in data directories and inside checkpoints.

What the tokenizer decides is kept too: whether its encodings start with bos (`add_bos`), every id that ends a
generation (`eos_ids`, from generation_config.json), and how text is encoded (`text_encoding`: "standard", as
transformers' tokenizers do today, or "transformers-4.33-slow", as SpeechGPT's released checkpoints were trained).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from speechgpt_fairseq.atomic_files import atomic_file
from speechgpt_fairseq.errors import InputError

logger = logging.getLogger(__name__)

SPEECHGPT_TOKENS = ("<sosp>", "<eosp>", "[Human]", "[SpeechGPT]", "<eoh>", "<eos>")
VOCAB_FILE = "vocab.json"
_FORMAT = "speechgpt-fairseq-vocab/2"
_FORMAT_1 = "speechgpt-fairseq-vocab/1"  # before add_bos, eos_ids and text_encoding; records held no <s>
_UNIT_RE = re.compile(r"<(\d+)>")
STANDARD = "standard"  # transformers' tokenizers today: spaces around added tokens kept, one dummy "▁" at the start
SLOW_433 = "transformers-4.33-slow"  # SpeechGPT's: added tokens eat the spaces beside them, every chunk gets a "▁"
TEXT_ENCODINGS = (STANDARD, SLOW_433)


class VocabularyError(InputError):
    """A tokenizer or vocabulary file that cannot be used, with the reason."""


def unit_token(k: int) -> str:
    return f"<{k}>"


@dataclass
class Vocabulary:
    """Every token string in id order, the special ids, and the base tokenizer that encodes text."""

    tokens: list[str]
    num_units: int
    unit_offset: int  # id of `<0>`; units are contiguous
    bos: int
    eos: int
    pad: int
    unk: int
    base_size: int  # tokens owned by the base tokenizer
    tokenizer_kind: str | None = None  # "sentencepiece", "tokenizers" or None (units only, no text)
    tokenizer_model: bytes | None = None
    add_bos: bool = True  # the tokenizer starts every encoding with bos (LLaMA's sentencepiece does, many do not)
    eos_ids: list[int] = field(default_factory=list)  # every id that ends a generation, eos first
    text_encoding: str = STANDARD

    def __post_init__(self):
        if len(set(self.tokens)) != len(self.tokens):
            raise VocabularyError("vocabulary has duplicate token strings")
        for name in SPEECHGPT_TOKENS:
            if name not in self.index:
                raise VocabularyError(f"vocabulary lacks the SpeechGPT token {name}")
        for k in (0, self.num_units - 1):
            if self.tokens[self.unit_offset + k] != unit_token(k):
                raise VocabularyError(f"unit {k} is not at id {self.unit_offset + k}")
        self.eos_ids = [self.eos] + [i for i in dict.fromkeys(self.eos_ids) if i != self.eos]
        if self.pad in (self.bos, *self.eos_ids):
            raise VocabularyError(f"the padding id {self.pad} ({self.tokens[self.pad]}) is also bos or an eos: fairseq "
                                  f"would never predict it (convert the tokenizer again)")
        if self.text_encoding not in TEXT_ENCODINGS:
            raise VocabularyError(f"unknown text encoding {self.text_encoding!r}; expected one of {TEXT_ENCODINGS}")
        if self.text_encoding == SLOW_433 and self.tokenizer_kind != "sentencepiece":
            raise VocabularyError(f"the {SLOW_433} text encoding needs a sentencepiece tokenizer")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def units_only(cls, num_units: int = 1000) -> "Vocabulary":
        """A vocabulary without text: LLaMA's three control tokens, the units and the SpeechGPT tokens."""
        base = ["<unk>", "<s>", "</s>"]
        return cls._extend(base, num_units, bos=1, eos=2, pad=0, unk=0, kind=None, model=None)

    @classmethod
    def from_tokenizer(cls, path: str | os.PathLike, num_units: int | None = None) -> "Vocabulary":
        """Read a base tokenizer: a `tokenizer.model`, a `tokenizer.json`, or a Hugging Face directory.

        Added tokens listed in the directory keep their ids; when the SpeechGPT tokens are not among them
        they are appended (K = `num_units`, default 1000).
        """
        path = Path(path)
        if path.is_dir():
            vocab = _from_hf_directory(path, num_units)
        elif not path.exists():
            raise VocabularyError(f"{path}: no such tokenizer file or directory")
        elif path.suffix == ".json":
            vocab = _from_tokenizers_json(path.read_bytes(), {}, [], num_units, source=path)
        else:
            vocab = _from_sentencepiece(path.read_bytes(), {}, [], num_units, source=path)
        logger.info(f"{path}: {vocab.describe()}")
        return vocab

    @classmethod
    def _extend(cls, base: list[str], num_units: int | None, *, bos, eos, pad, unk, kind, model,
                base_size: int | None = None, source: object = "tokenizer", add_bos: bool = True,
                eos_ids: list[int] = (), text_encoding: str = STANDARD) -> "Vocabulary":
        """Append units and SpeechGPT tokens to `base` unless it already holds them all; pick a padding id."""
        tokens = list(base)
        base_size = len(tokens) if base_size is None else base_size
        index = {t: i for i, t in enumerate(tokens)}
        present = [t for t in SPEECHGPT_TOKENS if t in index]
        if present and len(present) < len(SPEECHGPT_TOKENS):
            missing = [t for t in SPEECHGPT_TOKENS if t not in index]
            raise VocabularyError(f"{source}: has some SpeechGPT tokens but lacks {missing}")
        if present:  # already extended (e.g. SpeechGPT-7B-cm): keep its ids
            if "<0>" not in index:
                raise VocabularyError(f"{source}: has the SpeechGPT tokens but no unit token <0>")
            offset, found = index["<0>"], 0
            while offset + found < len(tokens) and tokens[offset + found] == unit_token(found):
                found += 1
            if num_units is not None and num_units != found:
                raise VocabularyError(f"{source}: carries {found} units, but {num_units} were asked for")
            num_units = found
            base_size = min(base_size, offset)
        else:
            num_units = 1000 if num_units is None else num_units
            if num_units < 1:
                raise VocabularyError(f"the number of units must be positive, got {num_units}")
            offset = len(tokens)
            tokens += [unit_token(k) for k in range(num_units)] + list(SPEECHGPT_TOKENS)
        eos_ids = [eos, *eos_ids]
        unknown = [i for i in eos_ids if not 0 <= i < len(base)]
        if unknown:
            raise VocabularyError(f"{source}: eos ids {unknown} (generation_config.json / config.json) are not "
                                  f"tokens of the tokenizer ({len(base)} tokens)")
        speech = [*range(offset, offset + num_units), *(tokens.index(t) for t in SPEECHGPT_TOKENS)]
        pad = choose_pad(tokens, pad, unk, bos, eos_ids, predicted=speech)
        if pad is None:
            pad = len(tokens)
            tokens.append("<pad>")
        return cls(tokens=tokens, num_units=num_units, unit_offset=offset, bos=bos, eos=eos, pad=pad,
                   unk=unk if unk is not None else pad, base_size=base_size, tokenizer_kind=kind,
                   tokenizer_model=model, add_bos=add_bos, eos_ids=eos_ids, text_encoding=text_encoding)

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("tokens", "num_units", "unit_offset", "bos", "eos", "pad", "unk",
                                           "base_size", "tokenizer_kind", "add_bos", "eos_ids", "text_encoding")}
        d["tokenizer_model"] = base64.b64encode(self.tokenizer_model).decode() if self.tokenizer_model else None
        return {"format": _FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict, source: object = "vocabulary") -> "Vocabulary":
        """A vocabulary from `to_dict`; one of format /1 (before add_bos) gets what that version did: bos always."""
        if d.get("format") not in (_FORMAT, _FORMAT_1):
            raise VocabularyError(f"{source}: not a speechgpt-fairseq vocabulary (format {d.get('format')!r})")
        d = dict(d)
        d.pop("format")
        model = d.pop("tokenizer_model")
        return cls(**d, tokenizer_model=base64.b64decode(model) if model else None)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON, atomically."""
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Load `vocab.json` (or a directory holding one)."""
        return cls.from_dict(read_vocab_json(path), source=_vocab_path(path))

    # ---- lookups ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    @cached_property
    def digest(self) -> str:
        """A fingerprint of the token strings and special ids: equal digests, interchangeable ids."""
        return dictionary_digest(self.to_dictionary())

    def unit_id(self, k: int) -> int:
        return self.unit_offset + k

    @property
    def added_tokens(self) -> list[str]:
        """Tokens beyond the base tokenizer, in id order."""
        return self.tokens[self.base_size:]

    @property
    def bos_ids(self) -> list[int]:
        """What the tokenizer puts before every text: [bos], or nothing."""
        return [self.bos] if self.add_bos else []

    def describe(self) -> str:
        """One line on the special tokens and the encoding, for logs."""
        def name(i: int) -> str:
            return f"{self.tokens[i]} ({i})"

        return (f"{len(self)} tokens ({self.num_units} units); bos {name(self.bos)} "
                f"{'added to' if self.add_bos else 'not added to'} every text; eos {name(self.eos)}"
                + (f", generation also ends at {', '.join(name(i) for i in self.eos_ids[1:])}" if self.eos_ids[1:]
                   else "")
                + f"; pad {name(self.pad)}; text encoding {self.text_encoding}")

    def to_dictionary(self):
        """The fairseq Dictionary of these ids (data/dictionary.py; imports fairseq)."""
        from speechgpt_fairseq.data.dictionary import SpeechGPTDictionary

        return SpeechGPTDictionary(self)

    @cached_property
    def encoder(self) -> "TextEncoder":
        return TextEncoder(self)

    def encode(self, text: str, continuation: bool = False) -> list[int]:
        """Token ids of mixed text and unit strings, as the tokenizer gives them without special tokens.

        `continuation`: the text continues earlier text (a response after its prompt), so it is encoded as
        it would be in the middle of a string: no leading sentencepiece "▁" is added (standard encoding only).
        """
        return self.encoder.encode(text, continuation)

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a model reads for `text`, bos first when the tokenizer adds it: `tokenizer(text).input_ids`."""
        return self.bos_ids + self.encode(text)

    def decode(self, ids) -> str:
        return self.encoder.decode(ids)

    @cached_property
    def token_texts(self) -> list[str]:
        """The text each token stands for inside a string (leading space kept, byte tokens as characters):
        what stop-text matching compares against."""
        return [self.encoder.token_text(i) for i in range(len(self))]


def choose_pad(tokens: list[str], pad: int | None, unk: int | None, bos: int, eos_ids: list[int],
               predicted: list[int]) -> int | None:
    """fairseq's padding id: masked out of the loss and never generated, so it must not be bos, an eos or a token
    the model predicts. The tokenizer's pad, else its unk, else None (a `<pad>` token is appended); logs why."""
    taken = {bos: "bos", **{i: "an eos" for i in eos_ids}, **{i: "a speech token" for i in predicted}}
    refused = []
    for role, i in (("pad", pad), ("unk", unk)):
        if i is None:
            continue
        if i not in taken:
            logger.info(f"padding id: {tokens[i]} ({i}), the tokenizer's {role}"
                        + (f" ({'; '.join(refused)})" if refused else ""))
            return i
        refused.append(f"its {role} {tokens[i]} is {taken[i]}")
    logger.info(f"padding id: a <pad> token appended ({'; '.join(refused) or 'the tokenizer has no pad and no unk'})")
    return None


def _vocab_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / VOCAB_FILE if path.is_dir() else path


def read_vocab_json(path: str | os.PathLike) -> dict:
    """The raw JSON of `vocab.json` (or of a directory holding one), with an error naming the file."""
    path = _vocab_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise VocabularyError(f"{path}: no vocabulary file (run `speechgpt prepare-units` or "
                              f"`speechgpt convert-hf` to write one)") from None
    except json.JSONDecodeError as e:
        raise VocabularyError(f"{path}: not valid JSON ({e})") from None


def records_hold_bos(vocab_json: dict) -> bool:
    """Whether data binarized with this vocab.json starts its records with the tokenizer's bos (format 2 on)."""
    return vocab_json.get("format") != _FORMAT_1


class TextEncoder:
    """Splits text at the vocabulary's added and control tokens and encodes the rest with the base tokenizer.

    Standard encoding: as Hugging Face's tokenizer on the exported directory; sentencepiece's dummy "▁" prefix
    goes only on the text at the very start of the string, and not when that text already begins with a space.
    transformers-4.33-slow: as that version's slow LlamaTokenizer; added tokens strip the whitespace on both
    sides, control tokens (bos, eos, unk) do not, and every remaining chunk gets sentencepiece's "▁" prefix.
    """

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.hf_tokenizer = None
        self._sp_first = self._sp_rest = None
        if vocab.tokenizer_kind == "tokenizers":
            from tokenizers import AddedToken, Tokenizer

            self.hf_tokenizer = Tokenizer.from_str(vocab.tokenizer_model.decode("utf-8"))
            have = self.hf_tokenizer.get_vocab_size(with_added_tokens=True)
            extra = vocab.tokens[have:]
            self.hf_tokenizer.add_tokens([AddedToken(t, normalized=False) for t in extra])
        elif vocab.tokenizer_kind == "sentencepiece":
            self._sp_first, self._sp_rest = _sentencepiece_pair(vocab.tokenizer_model)
        specials = {vocab.tokens[i] for i in (vocab.bos, vocab.eos, vocab.unk)} | set(vocab.added_tokens)
        literal = sorted((s for s in specials if not _UNIT_RE.fullmatch(s)), key=len, reverse=True)
        self._split = re.compile("|".join([r"<\d+>"] + [re.escape(s) for s in literal]))

    def encode(self, text: str, continuation: bool = False) -> list[int]:
        if self.hf_tokenizer is not None:
            if continuation:  # text after an added token is encoded as inside a string; drop that token
                return self.hf_tokenizer.encode(self.vocab.tokens[self.vocab.eos] + text,
                                                add_special_tokens=False).ids[1:]
            return self.hf_tokenizer.encode(text, add_special_tokens=False).ids
        chunks = self._chunks(text)
        if self.vocab.text_encoding == SLOW_433:
            return self._encode_slow_433(chunks)
        ids = []
        for k, (chunk, token_id) in enumerate(chunks):
            if token_id is not None:
                ids.append(token_id)
            else:
                self._encode_text(chunk, at_start=k == 0 and not continuation, out=ids)
        return ids

    def _chunks(self, text: str) -> list[tuple[str, int | None]]:
        """`text` as alternating (text, None) and (token, id) chunks, starting and ending with text (maybe empty)."""
        index, chunks, start = self.vocab.index, [], 0
        for m in self._split.finditer(text):
            token_id = index.get(m.group())
            if token_id is None:  # e.g. <1234> with K=1000: plain text, as HF treats it
                continue
            chunks += [(text[start:m.start()], None), (m.group(), token_id)]
            start = m.end()
        return chunks + [(text[start:], None)]

    def _encode_slow_433(self, chunks: list[tuple[str, int | None]]) -> list[int]:
        texts = [chunk for chunk, _ in chunks]
        for k, (_, token_id) in enumerate(chunks):
            if token_id is not None and token_id >= self.vocab.base_size:  # an added token eats spaces both sides
                texts[k - 1], texts[k + 1] = texts[k - 1].rstrip(), texts[k + 1].lstrip()
        ids = []
        for text, (_, token_id) in zip(texts, chunks):
            if token_id is not None:
                ids.append(token_id)
            elif text:
                self._encode_text(text, at_start=True, out=ids, dummy_prefix=True)
        return ids

    def _encode_text(self, text: str, at_start: bool, out: list[int], dummy_prefix: bool = False) -> None:
        if not text:
            return
        if self._sp_first is None:
            if text.strip():
                raise VocabularyError(f"this vocabulary has no text tokenizer (units only); cannot encode "
                                      f"{text[:40]!r}")
            return
        first = dummy_prefix or (at_start and not text.startswith(" "))
        out.extend((self._sp_first if first else self._sp_rest).encode(text))

    def token_text(self, i: int) -> str:
        v = self.vocab
        if i >= v.base_size or i in (v.bos, v.eos, v.pad, v.unk):
            return v.tokens[i]
        if self._sp_rest is not None:
            if self._sp_rest.is_byte(i):
                byte = int(v.tokens[i][3:-1], 16)
                return chr(byte) if byte < 128 else ""
            return v.tokens[i].replace("\u2581", " ")
        if self.hf_tokenizer is not None:
            return self.hf_tokenizer.decode([i], skip_special_tokens=False)
        return v.tokens[i]

    def decode(self, ids) -> str:
        """Text of `ids`; bos, pad and every eos are left out."""
        v = self.vocab
        hidden = {v.bos, v.pad, *v.eos_ids}
        parts, run = [], []

        def flush():
            if run:
                if self._sp_first is not None:
                    parts.append(self._sp_rest.decode(run))
                elif self.hf_tokenizer is not None:
                    parts.append(self.hf_tokenizer.decode(run, skip_special_tokens=False))
                run.clear()

        for i in (int(x) for x in ids):
            if i < v.base_size and i not in (v.unk, *hidden):
                run.append(i)
            else:
                flush()
                if i not in hidden:
                    parts.append(v.tokens[i])
        flush()
        return "".join(parts)


def _sentencepiece_pair(model: bytes):
    """Two processors for one model: with sentencepiece's dummy "▁" prefix, and without it."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    first = spm.SentencePieceProcessor(model_proto=model)
    proto.normalizer_spec.add_dummy_prefix = False
    rest = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return first, rest


# ---- reading base tokenizers -------------------------------------------------------------------
def _from_sentencepiece(model: bytes, config: dict, added: list[tuple[int, str]], num_units, source,
                        eos_ids: list[int] = ()) -> Vocabulary:
    """A sentencepiece model; `config`: what tokenizer_config.json / special_tokens_map.json say (may be empty)."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_proto=model)
    except Exception as e:
        raise VocabularyError(f"{source}: not a sentencepiece model ({e})") from None
    base = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    tokens = _with_added(base, added, source)
    index = {t: i for i, t in enumerate(tokens)}
    unk = sp.unk_id() if sp.unk_id() >= 0 else None
    pad = index.get(config.get("pad")) if config.get("pad") else (sp.pad_id() if sp.pad_id() >= 0 else None)
    bos = index.get(config.get("bos"), sp.bos_id()) if config.get("bos") else sp.bos_id()
    eos = index.get(config.get("eos"), sp.eos_id()) if config.get("eos") else sp.eos_id()
    if bos < 0 or eos < 0:
        raise VocabularyError(f"{source}: sentencepiece model without bos/eos ids")
    return Vocabulary._extend(tokens, num_units, bos=bos, eos=eos, pad=pad, unk=unk, kind="sentencepiece", model=model,
                              base_size=len(base), source=source, add_bos=config.get("add_bos_token", True),
                              eos_ids=eos_ids, text_encoding=_sentencepiece_encoding(config))


def _sentencepiece_encoding(config: dict) -> str:
    """SpeechGPT's released tokenizers (SpeechGPT-7B-ma/-cm/-com) are sentencepiece + added_tokens.json holding the
    SpeechGPT tokens, saved by transformers 4.33 without `legacy: false`: they trained on 4.33's slow encoding, where
    such added tokens strip the spaces beside them. So does an added `<sosp>` marked lstrip and rstrip (export-hf's
    way of writing that encoding)."""
    if config.get("legacy") is not False and config.get("sosp_strips"):
        return SLOW_433
    return STANDARD


def _from_tokenizers_json(raw: bytes, special_names: dict, added: list[tuple[int, str]], num_units,
                          source, eos_ids: list[int] = ()) -> Vocabulary:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:
        raise VocabularyError(f"{source}: not a Hugging Face tokenizer.json ({e})") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    base = [tok.id_to_token(i) for i in range(size)]
    if None in base:
        raise VocabularyError(f"{source}: token ids are not contiguous (id {base.index(None)} is missing)")
    tokens = _with_added(base, added, source)
    index = {t: i for i, t in enumerate(tokens)}

    def special(role: str, fallbacks: tuple[str, ...]) -> int | None:
        for name in (special_names.get(role), *fallbacks):
            if name is not None and name in index:
                return index[name]
        return None

    bos = special("bos", ("<s>", "<|begin_of_text|>", "<|endoftext|>"))
    eos = special("eos", ("</s>", "<|end_of_text|>", "<|endoftext|>"))
    if bos is None or eos is None:
        raise VocabularyError(f"{source}: cannot tell the bos and eos tokens; expected them named in "
                              f"tokenizer_config.json (bos_token, eos_token) or one of <s>/</s>")
    unk = special("unk", ("<unk>",))
    pad = special("pad", ()) if special_names.get("pad") else None
    # the post-processor decides whether the tokenizer puts bos first (transformers follows it)
    with_specials = tok.encode("a", add_special_tokens=True).ids
    add_bos = with_specials[:1] == [bos] and with_specials[1:] == tok.encode("a", add_special_tokens=False).ids
    # A tokenizer.json of ours already holds the added tokens; the base tokenizer ends where they begin.
    base_size = len(tokens)
    if "<sosp>" in index:
        base_size = index.get("<0>", base_size)
    return Vocabulary._extend(tokens, num_units, bos=bos, eos=eos, pad=pad, unk=unk, kind="tokenizers",
                              model=raw, base_size=base_size, source=source, add_bos=add_bos, eos_ids=eos_ids)


def _with_added(base: list[str], added: list[tuple[int, str]], source) -> list[str]:
    """The base tokens followed by a directory's added tokens, which must continue the ids without gaps."""
    tokens = list(base)
    for token_id, content in sorted(added):
        if token_id < len(base):
            if base[token_id] != content:
                raise VocabularyError(f"{source}: added token {content!r} has id {token_id}, which the base "
                                      f"tokenizer gives to {base[token_id]!r}")
            continue
        if token_id != len(tokens):
            raise VocabularyError(f"{source}: added token ids are not contiguous (expected id {len(tokens)} "
                                  f"next, found {token_id} for {content!r})")
        tokens.append(content)
    return tokens


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise VocabularyError(f"{path}: unreadable ({e})") from None


def generation_eos_ids(path: Path) -> list[int]:
    """The eos ids a Hugging Face model directory ends generation at: generation_config.json's, then config.json's
    (an id or a list, as Llama 3 Instruct lists three)."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(path / name).get("eos_token_id")
        ids += value if isinstance(value, list) else [] if value is None else [value]
    return [int(i) for i in dict.fromkeys(ids)]


def _from_hf_directory(path: Path, num_units) -> Vocabulary:
    """A Hugging Face tokenizer directory: tokenizer.model or tokenizer.json, plus its added tokens."""
    config = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")
    names = {role: _token_content(config.get(f"{role}_token") or special_map.get(f"{role}_token"))
             for role in ("bos", "eos", "unk", "pad")}
    added: dict[int, str] = {}
    decoder = config.get("added_tokens_decoder") or {}
    for token_id, entry in decoder.items():
        added[int(token_id)] = entry["content"]
    added_json = _read_json(path / "added_tokens.json")
    for content, token_id in added_json.items():
        added[int(token_id)] = content
    added_list = sorted(added.items())
    eos_ids = generation_eos_ids(path)
    if (path / "tokenizer.model").exists():
        # transformers 4.33 strips around a token of added_tokens.json; later versions follow the token's flags
        sosp = next((e for e in decoder.values() if e.get("content") == "<sosp>"), None)
        strips = "<sosp>" in added_json if sosp is None else bool(sosp.get("lstrip") and sosp.get("rstrip"))
        settings = {**names, "legacy": config.get("legacy"), "sosp_strips": strips}
        if "add_bos_token" in config:
            settings["add_bos_token"] = bool(config["add_bos_token"])
        return _from_sentencepiece((path / "tokenizer.model").read_bytes(), settings, added_list, num_units,
                                   source=path / "tokenizer.model", eos_ids=eos_ids)
    if (path / "tokenizer.json").exists():
        return _from_tokenizers_json((path / "tokenizer.json").read_bytes(), names, added_list, num_units,
                                     source=path / "tokenizer.json", eos_ids=eos_ids)
    raise VocabularyError(f"{path}: no tokenizer found; expected tokenizer.model (sentencepiece) or "
                          f"tokenizer.json (Hugging Face tokenizers)")


def dictionary_difference(theirs, ours) -> str:
    """What differs between two fairseq Dictionaries, in a few words: sizes, the ids holding other tokens (the
    first of them shown), the special ids."""
    parts = [f"{len(theirs)} tokens against {len(ours)}"] if len(theirs) != len(ours) else []
    other = [i for i, (a, b) in enumerate(zip(theirs.symbols, ours.symbols)) if a != b]
    if other:
        i = other[0]
        parts.append(f"{len(other)} ids hold other tokens, the first id {i}: {theirs.symbols[i]!r} against "
                     f"{ours.symbols[i]!r}")
    for name in ("bos", "eos", "pad", "unk"):
        if getattr(theirs, name)() != getattr(ours, name)():
            parts.append(f"{name} id {getattr(theirs, name)()} against {getattr(ours, name)()}")
    return "; ".join(parts) or "the same tokens and special ids"


def dictionary_digest(dictionary) -> str:
    """Vocabulary.digest for any fairseq Dictionary: the symbols in id order and the special ids."""
    payload = [list(dictionary.symbols), dictionary.bos(), dictionary.eos(), dictionary.pad(), dictionary.unk()]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()
