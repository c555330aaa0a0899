"""CLIP's byte-level BPE tokenizer (what ImageBind's text tower reads), from `bpe_simple_vocab_16e6.txt.gz`.

Ids: 256 byte symbols, the same with an end-of-word mark, one per merge (48,894 merges), then
<|startoftext|> and <|endoftext|> (49406, 49407). A text becomes [start] + BPE ids + [end], zero
padded to the context length. Text is lower-cased and whitespace-collapsed; the exporter only feeds
it ASCII prompts, so CLIP's Unicode repair step (ftfy) has nothing to do and is left out.
"""
from __future__ import annotations

import gzip
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

N_MERGES = 49152 - 256 - 2
_WORDS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
                    re.IGNORECASE)


@lru_cache()
def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            symbols.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, symbols)))


class ClipTokenizer:
    def __init__(self, bpe_path: str | Path, context_length: int = 77):
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{bpe_path}: expected {N_MERGES} BPE merges (CLIP's bpe_simple_vocab_16e6.txt.gz)")
        symbols = list(_byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.start, self.end = self.ids["<|startoftext|>"], self.ids["<|endoftext|>"]
        self.context_length = context_length
        self._cache: dict[str, list[str]] = {}

    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        table = _byte_symbols()
        text = " ".join(text.split()).lower()
        ids = []
        for word in _WORDS.findall(text):
            ids += [self.ids[p] for p in self._bpe("".join(table[b] for b in word.encode("utf-8")))]
        return ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Texts -> len(texts) x context_length int64 ids (truncated like CLIP: the end token may be cut)."""
        out = np.zeros((len(texts), self.context_length), np.int64)
        for i, text in enumerate(texts):
            ids = ([self.start] + self.encode(text) + [self.end])[:self.context_length]
            out[i, :len(ids)] = ids
        return out
