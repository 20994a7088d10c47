"""Text template and token cache: (component, inputs, outputs) -> prefix token ids + suffix token ids.

Layout (the prefix is shared by every candidate output of one input, which is what prefix sharing exploits):

    prefix = [BOS/CLS] + tokens(description + separator + inputs) [+ SEP for encoders]
    suffix = tokens(outputs) [+ SEP for encoders] [+ EOS for decoders with append_eos]

The two halves are tokenised separately (and cached separately), so a prefix's ids never depend on the
suffix it is paired with. Truncation only ever shortens the prefix body; an output that does not fit on its
own is an error, because silently cutting the thing being scored would change what the reward means.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optimas_fast._native import native_available
from optimas_fast._validate import check_bool, check_choice, check_int

from .wordpiece import NativeWordPiece

logger = logging.getLogger(__name__)


def plain_backend(tokenizer: Any):
    """A copy of a fast tokenizer's Rust backend with padding and truncation off (a tokenizer.json may carry
    either, e.g. MiniLM's pads to 128; ``tokenizer(...)`` switches them per call, the backend does not), or
    None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def batch_token_ids(tokenizer: Any, texts: Sequence[str], backend: Any = None) -> list[tuple[int, ...]]:
    """Ids of many texts without special tokens, in one call: the same ids as
    ``tokenizer(texts, add_special_tokens=False)`` (tests check it). With ``backend`` (``plain_backend(tokenizer)``)
    the Rust backend is called directly, without building a BatchEncoding (MiniLM, 100k short texts, 2 busy
    cores: 21 us/text vs 42 through ``__call__``)."""
    if not texts:
        return []
    if backend is not None:
        return [tuple(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [tuple(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


@dataclass
class TemplateConfig:
    max_length: int = 512  # longest row in tokens (prefix + suffix, special tokens included)
    prefix_format: str = "{description}\n\nInputs:\n{inputs}\n\nOutputs:\n"  # description + inputs -> prefix
    truncation_side: str = "left"  # which end of an over-long prefix body to drop: "left" keeps the inputs' end
    # (closest to the outputs), "right" keeps the description and the inputs' start
    min_prefix_tokens: int = 1  # a row must keep at least this many prefix-body tokens, else it is an error
    # decoders: end the suffix with the tokenizer's EOS id, so last-token pooling reads a fixed token that has
    # attended to the whole row (TRL's RewardTrainer appends EOS to prompt + response). It counts toward
    # max_length and is never truncated, like the rest of the suffix. No effect on encoders (their suffix
    # already ends with SEP) or on tokenizers without an EOS (a warning says so). Absent from checkpoints
    # written before it existed: they load with False, the layout they were trained with.
    append_eos: bool = False

    def validate(self, prefix: str = "TemplateConfig.") -> None:
        """ValueError naming the bad field as ``{prefix}{field}`` (``config.template.`` inside a RewardModelConfig,
        ``reward.template.`` in a run's YAML)."""
        p = prefix
        check_int(self.max_length, f"{p}max_length", min=4)
        if not isinstance(self.prefix_format, str) or "{inputs}" not in self.prefix_format:
            raise ValueError(f"{p}prefix_format must be a str containing '{{inputs}}', got {self.prefix_format!r}")
        check_choice(self.truncation_side, f"{p}truncation_side", ["left", "right"])
        check_int(self.min_prefix_tokens, f"{p}min_prefix_tokens", min=0)
        check_bool(self.append_eos, f"{p}append_eos")


@dataclass(frozen=True)
class Tokenised:
    """One request after the template: ids ready for the scheduler."""

    head_id: int  # index of the component's head
    prefix: tuple[int, ...]  # prefix ids incl. leading special tokens (after truncation)
    suffix: tuple[int, ...]  # suffix ids incl. trailing special tokens
    prefix_key: int  # interned id of `prefix` (equal prefixes -> equal keys)
    truncated: int  # prefix-body tokens dropped by truncation


class TokenCache:
    """Applies the template and caches token ids per distinct text (each string is tokenised once).

    Why cache: during optimisation the same inputs are scored against thousands of candidate outputs and the
    same pairs are revisited every epoch; tokenisation is pure-Python-ish and otherwise dominates small steps.

    Bounded: ``max_entries`` (None = unbounded) caps the text -> ids entries and, separately, the interned
    prefixes; the least recently used entry goes first. Prefix keys come from a counter that never reuses a
    value, so an evicted and re-seen prefix gets a fresh key: it can only cost sharing/dedupe inside one call
    (equal prefixes with different keys run as separate groups, still exact), never merge two different
    prefixes. Memory: an entry is its text's ids as a tuple (~8 bytes per token) plus the key string.

    ``native``: for BERT-type tokenizers, the C++ WordPiece (``wordpiece.NativeWordPiece``) that tokenises
    printable-ASCII texts with Hugging Face's ids at a fraction of the cost; None otherwise. Set it to None
    to send every text through Hugging Face.
    """

    def __init__(self, tokenizer: Any, config: TemplateConfig, is_encoder: bool, max_entries: int | None = None):
        config.validate()
        check_int(max_entries, "token cache max_entries", min=1, allow_none=True)
        self.tokenizer = tokenizer
        self._backend = plain_backend(tokenizer)  # batched calls go straight to Rust
        # BERT-type tokenizers: printable-ASCII texts go through the native WordPiece (same ids, tested),
        # the rest through Hugging Face
        self.native = NativeWordPiece.from_tokenizer(tokenizer) if native_available() else None
        self.config = config
        self.is_encoder = is_encoder
        self.max_entries = max_entries
        cls_or_bos = tokenizer.cls_token_id if is_encoder else tokenizer.bos_token_id
        self.lead: tuple[int, ...] = (cls_or_bos,) if cls_or_bos is not None else ()
        sep = tokenizer.sep_token_id if is_encoder else None
        self.sep: tuple[int, ...] = (sep,) if sep is not None else ()
        eos = None if is_encoder else getattr(tokenizer, "eos_token_id", None)
        self.eos: tuple[int, ...] = (eos,) if eos is not None else ()  # decoders' EOS, for append_eos
        if config.append_eos and not is_encoder and not self.eos:
            logger.warning(
                "TemplateConfig.append_eos=True, but the tokenizer has no eos_token_id: rows end with "
                "the outputs' last token (set tokenizer.eos_token to append one)"
            )
        self._text_ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._prefix_keys: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self._next_key = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._text_ids)

    @property
    def appends_eos(self) -> bool:
        """Whether suffixes end with EOS: ``config.append_eos`` on a decoder whose tokenizer has one."""
        return bool(self.config.append_eos and self.eos)

    @property
    def tail(self) -> tuple[int, ...]:
        """Special tokens after the outputs' ids: SEP on encoders, EOS on decoders with append_eos, else none.
        Read from the config on every call (not at init), so a template edited in place applies at once."""
        if self.is_encoder:
            return self.sep
        return self.eos if self.config.append_eos else ()

    def _trim(self, d: OrderedDict) -> None:
        if self.max_entries is not None:
            while len(d) > self.max_entries:
                d.popitem(last=False)  # least recently used
                self.evictions += 1

    def _ids(self, text: str) -> tuple[int, ...]:
        ids = self._text_ids.get(text)
        if ids is None:
            self.misses += 1
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._text_ids[text] = ids
            self._trim(self._text_ids)
        else:
            self.hits += 1
            self._text_ids.move_to_end(text)
        return ids

    def ids_many(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """Token ids of each text (no special tokens): cached ones from the cache, the rest in ONE batched
        tokenizer call (a fast tokenizer encodes a list in Rust, in parallel). ``texts`` should be distinct:
        callers dedupe first, and hits/misses count per text here."""
        out: list = [None] * len(texts)
        todo: list[int] = []
        get, move = self._text_ids.get, self._text_ids.move_to_end
        for i, t in enumerate(texts):
            ids = get(t)
            if ids is None:
                todo.append(i)
            else:
                out[i] = ids
                move(t)
        self.hits += len(texts) - len(todo)
        self.misses += len(todo)
        if todo:
            missing = [texts[i] for i in todo]
            new = self.native.encode_many(missing) if self.native is not None else [None] * len(todo)
            rest = [k for k, ids in enumerate(new) if ids is None]
            if rest:
                for k, ids in zip(rest, batch_token_ids(self.tokenizer, [missing[k] for k in rest], self._backend)):
                    new[k] = ids
            for i, ids in zip(todo, new):
                out[i] = self._text_ids[texts[i]] = ids
            self._trim(self._text_ids)
        return out

    def _prefix_key(self, prefix: tuple[int, ...]) -> int:
        key = self._prefix_keys.get(prefix)
        if key is None:
            key = self._prefix_keys[prefix] = self._next_key
            self._next_key += 1
            self._trim(self._prefix_keys)
        else:
            self._prefix_keys.move_to_end(prefix)
        return key

    def prefix_text(self, description: str, inputs: str) -> str:
        return self.config.prefix_format.format(description=description, inputs=inputs)

    def encode(self, head_id: int, description: str, inputs: str, outputs: str) -> Tokenised:
        body = self._ids(self.prefix_text(description, inputs))
        suffix = self._ids(outputs) + self.tail
        fixed = len(self.lead) + len(self.sep) + len(suffix)
        room = self.config.max_length - fixed
        if room < self.config.min_prefix_tokens:
            raise ValueError(
                f"outputs text is {len(suffix)} tokens: with the template it needs "
                f"{fixed + self.config.min_prefix_tokens}"
                f" > max_length={self.config.max_length}; the suffix is never truncated: raise max_length or "
                "shorten the outputs"
            )
        dropped = max(0, len(body) - room)
        if dropped:
            body = body[dropped:] if self.config.truncation_side == "left" else body[: len(body) - dropped]
        prefix = self.lead + body + self.sep
        key = self._prefix_key(prefix)
        return Tokenised(head_id, prefix, suffix, key, dropped)

    def clear(self) -> None:
        self._text_ids.clear()
        self._prefix_keys.clear()
