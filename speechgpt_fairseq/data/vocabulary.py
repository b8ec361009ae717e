"""The SpeechGPT vocabulary: a base LLM tokenizer's ids kept exactly, then K units and the SpeechGPT tokens.

Layout (DESIGN.md): base tokens (LLaMA sentencepiece: unk=0, bos=1, eos=2), then `<0>` … `<K-1>`, `<sosp>`,
`<eosp>`, `[Human]`, `[SpeechGPT]`, `<eoh>`, `<eos>`. A tokenizer that already carries these tokens (the
released SpeechGPT-7B-ma/-cm) keeps its own ids. The vocabulary travels as one JSON file (`vocab.json`, with
the base tokenizer model embedded) in data directories and inside checkpoints.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from fairseq.data import Dictionary

from speechgpt_fairseq.atomic_files import atomic_file

SPEECHGPT_TOKENS = ("<sosp>", "<eosp>", "[Human]", "[SpeechGPT]", "<eoh>", "<eos>")
VOCAB_FILE = "vocab.json"
_FORMAT = "speechgpt-fairseq-vocab/1"
_UNIT_RE = re.compile(r"<(\d+)>")


class VocabularyError(ValueError):
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

    def __post_init__(self):
        if len(set(self.tokens)) != len(self.tokens):
            raise VocabularyError("vocabulary has duplicate token strings")
        for name in SPEECHGPT_TOKENS:
            if name not in self.index:
                raise VocabularyError(f"vocabulary lacks the SpeechGPT token {name}")
        for k in (0, self.num_units - 1):
            if self.tokens[self.unit_offset + k] != unit_token(k):
                raise VocabularyError(f"unit {k} is not at id {self.unit_offset + k}")

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
            return _from_hf_directory(path, num_units)
        if not path.exists():
            raise VocabularyError(f"{path}: no such tokenizer file or directory")
        if path.suffix == ".json":
            return _from_tokenizers_json(path.read_bytes(), {}, [], num_units, source=path)
        return _from_sentencepiece(path.read_bytes(), [], num_units, source=path)

    @classmethod
    def _extend(cls, base: list[str], num_units: int | None, *, bos, eos, pad, unk, kind, model,
                base_size: int | None = None, source: object = "tokenizer") -> "Vocabulary":
        """Append units and SpeechGPT tokens to `base` unless it already holds them all."""
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
        if pad is None:  # no pad and no unk in the base: a pad token of our own, last
            pad = len(tokens)
            tokens.append("<pad>")
        return cls(tokens=tokens, num_units=num_units, unit_offset=offset, bos=bos, eos=eos, pad=pad,
                   unk=unk if unk is not None else pad, base_size=base_size, tokenizer_kind=kind,
                   tokenizer_model=model)

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("tokens", "num_units", "unit_offset", "bos", "eos", "pad", "unk",
                                           "base_size", "tokenizer_kind")}
        d["tokenizer_model"] = base64.b64encode(self.tokenizer_model).decode() if self.tokenizer_model else None
        return {"format": _FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict, source: object = "vocabulary") -> "Vocabulary":
        if d.get("format") != _FORMAT:
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
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise VocabularyError(f"{path}: no vocabulary file (run `speechgpt prepare-units` or "
                                  f"`speechgpt convert-hf` to write one)") from None
        except json.JSONDecodeError as e:
            raise VocabularyError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

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

    def to_dictionary(self) -> "SpeechGPTDictionary":
        return SpeechGPTDictionary(self)

    @cached_property
    def encoder(self) -> "TextEncoder":
        return TextEncoder(self)

    def encode(self, text: str, continuation: bool = False) -> list[int]:
        """Token ids of mixed text and unit strings, as Hugging Face's tokenizer gives them (no bos/eos).

        `continuation`: the text continues earlier text (a response after its prompt), so it is encoded as
        it would be in the middle of a string: no leading sentencepiece "▁" is added.
        """
        return self.encoder.encode(text, continuation)

    def decode(self, ids) -> str:
        return self.encoder.decode(ids)

    @cached_property
    def token_texts(self) -> list[str]:
        """The text each token stands for inside a string (leading space kept, byte tokens as characters):
        what stop-text matching compares against."""
        return [self.encoder.token_text(i) for i in range(len(self))]


class SpeechGPTDictionary(Dictionary):
    """A fairseq Dictionary with the vocabulary's ids, specials where the base tokenizer put them."""

    def __init__(self, vocab: Vocabulary):
        t = vocab.tokens
        super().__init__(bos=t[vocab.bos], pad=t[vocab.pad], eos=t[vocab.eos], unk=t[vocab.unk],
                         add_special_symbols=False)
        for token in t:
            self.add_symbol(token)
        self.bos_index, self.pad_index, self.eos_index, self.unk_index = vocab.bos, vocab.pad, vocab.eos, vocab.unk
        self.nspecial = max(vocab.bos, vocab.eos, vocab.unk) + 1 if vocab.base_size else 0
        self.vocab = vocab


class TextEncoder:
    """Splits text at the vocabulary's added and control tokens and encodes the rest with the base tokenizer.

    Matches Hugging Face's tokenizer on the exported directory: sentencepiece's dummy "▁" prefix goes only
    on the text at the very start of the string, and not when that text already begins with a space.
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
        index, ids, start = self.vocab.index, [], 0
        at_start = not continuation
        for m in self._split.finditer(text):
            token_id = index.get(m.group())
            if token_id is None:  # e.g. <1234> with K=1000: plain text, as HF treats it
                continue
            self._encode_text(text[start:m.start()], at_start=at_start and start == 0, out=ids)
            ids.append(token_id)
            start = m.end()
        self._encode_text(text[start:], at_start=at_start and start == 0, out=ids)
        return ids

    def _encode_text(self, text: str, at_start: bool, out: list[int]) -> None:
        if not text:
            return
        if self._sp_first is None:
            if text.strip():
                raise VocabularyError(f"this vocabulary has no text tokenizer (units only); cannot encode {text[:40]!r}")
            return
        sp = self._sp_first if at_start and not text.startswith(" ") else self._sp_rest
        out.extend(sp.encode(text))

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
        v = self.vocab
        parts, run = [], []

        def flush():
            if run:
                if self._sp_first is not None:
                    parts.append(self._sp_rest.decode(run))
                elif self.hf_tokenizer is not None:
                    parts.append(self.hf_tokenizer.decode(run, skip_special_tokens=False))
                run.clear()

        for i in (int(x) for x in ids):
            if i < v.base_size and i not in (v.bos, v.eos, v.pad, v.unk):
                run.append(i)
            else:
                flush()
                if i not in (v.bos, v.eos, v.pad):
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
def _from_sentencepiece(model: bytes, added: list[tuple[int, str]], num_units, source) -> Vocabulary:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_proto=model)
    except Exception as e:
        raise VocabularyError(f"{source}: not a sentencepiece model ({e})") from None
    base = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    tokens = _with_added(base, added, source)
    unk = sp.unk_id() if sp.unk_id() >= 0 else None
    pad = sp.pad_id() if sp.pad_id() >= 0 else unk
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise VocabularyError(f"{source}: sentencepiece model without bos/eos ids")
    return Vocabulary._extend(tokens, num_units, bos=sp.bos_id(), eos=sp.eos_id(), pad=pad, unk=unk,
                              kind="sentencepiece", model=model, base_size=len(base), source=source)


def _from_tokenizers_json(raw: bytes, special_names: dict, added: list[tuple[int, str]], num_units,
                          source) -> Vocabulary:
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
    pad = special("pad", ()) if special_names.get("pad") else unk
    # A tokenizer.json of ours already holds the added tokens; the base tokenizer ends where they begin.
    base_size = len(tokens)
    if "<sosp>" in index:
        base_size = index.get("<0>", base_size)
    return Vocabulary._extend(tokens, num_units, bos=bos, eos=eos, pad=pad, unk=unk, kind="tokenizers",
                              model=raw, base_size=base_size, source=source)


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


def _from_hf_directory(path: Path, num_units) -> Vocabulary:
    """A Hugging Face tokenizer directory: tokenizer.model or tokenizer.json, plus its added tokens."""
    config = {}
    if (path / "tokenizer_config.json").exists():
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    special_map = {}
    if (path / "special_tokens_map.json").exists():
        special_map = json.loads((path / "special_tokens_map.json").read_text(encoding="utf-8"))
    names = {role: _token_content(config.get(f"{role}_token") or special_map.get(f"{role}_token"))
             for role in ("bos", "eos", "unk", "pad")}
    added: dict[int, str] = {}
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        added[int(token_id)] = entry["content"]
    if (path / "added_tokens.json").exists():
        for content, token_id in json.loads((path / "added_tokens.json").read_text(encoding="utf-8")).items():
            added[int(token_id)] = content
    added_list = sorted(added.items())
    if (path / "tokenizer.model").exists():
        return _from_sentencepiece((path / "tokenizer.model").read_bytes(), added_list, num_units,
                                   source=path / "tokenizer.model")
    if (path / "tokenizer.json").exists():
        return _from_tokenizers_json((path / "tokenizer.json").read_bytes(), names, added_list, num_units,
                                     source=path / "tokenizer.json")
    raise VocabularyError(f"{path}: no tokenizer found; expected tokenizer.model (sentencepiece) or "
                          f"tokenizer.json (Hugging Face tokenizers)")


def dictionary_digest(dictionary: Dictionary) -> str:
    """Vocabulary.digest for any fairseq Dictionary: the symbols in id order and the special ids."""
    payload = [list(dictionary.symbols), dictionary.bos(), dictionary.eos(), dictionary.pad(), dictionary.unk()]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()
