"""Dense-OCR reward: 1 - normalised Levenshtein distance on Unicode characters (pure numpy).

The distance is Myers' bit-parallel algorithm in Hyyrö's formulation, vectorised over every pair
of a call: the longer string of each pair is the bit-vector side (64 rows per uint64 word), the
shorter one is scanned column by column. Multi-word columns run as a wavefront: at step ``t``
word ``w`` works on column ``t - w``, so the carry and the shifted-out bits a word needs from the
word below were made one step earlier and no step waits on a carry chain. One step is ~25 numpy
operations on ``[pairs, words]`` arrays, whatever the number of pairs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_WORD = 64
_ONE = np.uint64(1)
_TOP = np.uint64(63)
_CHUNK_PAIRS = 512  # pairs run together (bounds the working set of one step)
_EQ_BLOCK = 64  # steps whose Eq words are gathered at once


def _code_points(text: str) -> np.ndarray:
    """``[L]`` uint32 code points of ``text`` (one per Python character, lone surrogates too)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _strip_common(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the common prefix and suffix (they never change the distance)."""
    n = min(len(x), len(y))
    differ = np.flatnonzero(x[:n] != y[:n])
    start = differ[0] if len(differ) else n
    x, y = x[start:], y[start:]
    n = min(len(x), len(y))
    differ = np.flatnonzero(x[::-1][:n] != y[::-1][:n])
    stop = differ[0] if len(differ) else n
    return x[:len(x) - stop], y[:len(y) - stop]


def _bit_parallel(patterns: list[np.ndarray], texts: list[np.ndarray], words: int) -> np.ndarray:
    """Distances ``[N]`` of pairs whose patterns (non-empty) fit ``words`` words; texts non-empty.

    ``Peq[c]`` has bit ``i`` set where the pattern's character ``i`` is ``c``; characters are
    keyed per pair (``pair << 21 | code point``) so one table serves the whole group.
    """
    n_pairs = len(patterns)
    lengths = np.array([len(p) for p in patterns])
    text_len = np.array([len(t) for t in texts])
    steps = int(text_len.max())
    # ---- Peq table over the group's (pair, character) keys; row `n_keys` is all zeros
    pair_of = np.repeat(np.arange(n_pairs, dtype=np.uint64), lengths)
    keys = (pair_of << np.uint64(21)) | np.concatenate(patterns).astype(np.uint64)
    uniq, key_row = np.unique(keys, return_inverse=True)
    bits = np.zeros((len(uniq) + 1, words * _WORD), np.bool_)
    bits[key_row, np.concatenate([np.arange(m) for m in lengths])] = True
    peq = np.packbits(bits, axis=1, bitorder="little").view("<u8").astype(np.uint64)
    # ---- texts right-aligned to a common last column (earlier columns read the zero row),
    # with `words` zero columns on either side
    zero = len(uniq)
    row = np.full((n_pairs, words + steps + words), zero, np.int64)
    for p, t in enumerate(texts):
        tkeys = (np.uint64(p) << np.uint64(21)) | t.astype(np.uint64)
        pos = np.minimum(np.searchsorted(uniq, tkeys), zero - 1)
        row[p, words + steps - len(t):words + steps] = np.where(uniq[pos] == tkeys, pos, zero)
    # eq[t, p, w] = Peq row of text column t - w, word w: the wavefront's diagonal, gathered
    # in blocks of steps from flat indices (row * words + w)
    total = steps + words - 1
    flat = (row * words).astype(np.int32 if peq.size < 2**31 else np.int64)
    window = np.lib.stride_tricks.sliding_window_view(flat, words, axis=1)
    diag = window[:, 1:total + 1, ::-1].transpose(1, 0, 2)  # [T, N, W]
    word_index = np.arange(words, dtype=flat.dtype)
    peq_flat = peq.ravel()

    begin = steps - text_len  # first step at which each pair's word 0 is live
    live = (np.arange(total)[:, None] >= begin[None, :]).astype(np.uint64)  # [T, N]
    vp = np.full((n_pairs, words), ~np.uint64(0))
    vn, x, d0, s, tmp, hp, hn = (np.zeros((n_pairs, words), np.uint64) for _ in range(7))
    cin, hpin, hnin, hpout, hnout = (np.zeros((n_pairs, words), np.uint64) for _ in range(5))
    c1, c2 = np.zeros((n_pairs, words), np.bool_), np.zeros((n_pairs, words), np.bool_)
    final_vp, final_vn = np.zeros_like(vp), np.zeros_like(vn)
    for t in range(total):
        if t % _EQ_BLOCK == 0:
            eq = np.take(peq_flat, diag[t:t + _EQ_BLOCK] + word_index)
        hpin[:, 0] = live[t]
        np.bitwise_or(eq[t % _EQ_BLOCK], vn, out=x)          # X = Eq | VN
        np.bitwise_and(x, vp, out=s)
        np.add(s, vp, out=s)                        # (X & VP) + VP, word by word ...
        np.less(s, vp, out=c1)                      # ... its carry out ...
        np.add(s, cin, out=s)                       # ... plus the carry in from the word below
        np.less(s, cin, out=c2)
        np.bitwise_or(c1[:, :-1], c2[:, :-1], out=cin[:, 1:], casting="unsafe")
        np.bitwise_xor(s, vp, out=d0)
        np.bitwise_or(d0, x, out=d0)                # D0
        np.bitwise_or(d0, vp, out=tmp)
        np.invert(tmp, out=tmp)
        np.bitwise_or(tmp, vn, out=hp)              # HP = VN | ~(D0 | VP)
        np.bitwise_and(d0, vp, out=hn)              # HN = D0 & VP
        np.right_shift(hp[:, :-1], _TOP, out=hpout[:, 1:])  # bits for the next word
        np.left_shift(hp, _ONE, out=hp)
        np.bitwise_or(hp, hpin, out=hp)             # row 0 is +1 per column (global distance)
        np.right_shift(hn[:, :-1], _TOP, out=hnout[:, 1:])
        np.left_shift(hn, _ONE, out=hn)
        np.bitwise_or(hn, hnin, out=hn)
        hpin, hpout, hnin, hnout = hpout, hpin, hnout, hnin
        np.bitwise_or(d0, hp, out=tmp)
        np.invert(tmp, out=tmp)
        np.bitwise_or(tmp, hn, out=vp)              # VP = HN << 1 | ~(D0 | HP << 1)
        np.bitwise_and(hp, d0, out=vn)              # VN = HP << 1 & D0
        w = t - (steps - 1)                         # word w has just done the last column
        if w >= 0:
            final_vp[:, w], final_vn[:, w] = vp[:, w], vn[:, w]
    # D[m, n] = n + sum of the vertical deltas of the last column over rows 1..m
    bit = np.arange(words * _WORD)
    below = np.packbits(bit[None, :] < lengths[:, None], axis=1,
                        bitorder="little").view("<u8").astype(np.uint64)
    up = np.bitwise_count(final_vp & below).sum(axis=1, dtype=np.int64)
    down = np.bitwise_count(final_vn & below).sum(axis=1, dtype=np.int64)
    return text_len + up - down


def levenshtein_batch(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Edit distances ``[N]`` int64 (insert / delete / substitute, cost 1) of ``a[i]`` vs ``b[i]``.

    All pairs run together (bit-parallel, see the module doc); exact for any Unicode strings.
    """
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} and {len(b)} strings")
    out = np.zeros(len(a), np.int64)
    todo: list[tuple[int, np.ndarray, np.ndarray]] = []
    for i, (s, t) in enumerate(zip(a, b)):
        x, y = _strip_common(_code_points(s), _code_points(t))
        if len(x) < len(y):
            x, y = y, x  # x (the longer) is the bit-vector side
        if len(y) == 0:
            out[i] = len(x)
            continue
        todo.append((i, x, y))
    # pairs sorted by size run in chunks; a chunk's patterns need at most twice its smallest's words
    todo.sort(key=lambda item: (len(item[1]), len(item[2])))
    lo = 0
    while lo < len(todo):
        hi = lo + 1
        smallest = -(-len(todo[lo][1]) // _WORD)
        while (hi < len(todo) and hi - lo < _CHUNK_PAIRS
               and -(-len(todo[hi][1]) // _WORD) <= 2 * smallest):
            hi += 1
        chunk = todo[lo:hi]
        words = -(-len(chunk[-1][1]) // _WORD)
        out[[i for i, _, _ in chunk]] = _bit_parallel([x for _, x, _ in chunk],
                                                      [y for _, _, y in chunk], words)
        lo = hi
    return out


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert / delete / substitute, cost 1 each) between two strings."""
    return int(levenshtein_batch([a], [b])[0])


def edit_similarity(pred: str, ref: str) -> float:
    """``1 - levenshtein / max(len(pred), len(ref))`` in [0, 1]; two empty strings give 1."""
    longest = max(len(pred), len(ref))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(pred, ref) / longest


def ocr_rewards(texts: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """OCR reward of each response: ``texts`` ``[N]`` vs ``references`` ``[N]`` -> ``[N]`` float32.

    ``1 - levenshtein / max(len(text), len(reference))`` (1 for two empty strings); all pairs
    of the call are computed together. Raises ValueError when the two sequences differ in
    length, TypeError naming the index when an element is not a str.
    """
    if len(texts) != len(references):
        raise ValueError(f"texts has {len(texts)} items but references has {len(references)}")
    for n, (pred, ref) in enumerate(zip(texts, references)):
        if not isinstance(pred, str) or not isinstance(ref, str):
            raise TypeError(f"texts[{n}] and references[{n}] must be str, got "
                            f"{type(pred).__name__} and {type(ref).__name__}")
    longest = np.array([max(len(p), len(r)) for p, r in zip(texts, references)], np.int64)
    dist = levenshtein_batch(texts, references)
    out = 1.0 - dist / np.maximum(longest, 1)
    return out.astype(np.float32)
