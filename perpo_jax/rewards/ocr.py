"""Dense-OCR reward: 1 - normalised Levenshtein distance on Unicode characters (pure numpy).

The distance is Myers' bit-parallel algorithm in Hyyrö's formulation, vectorised over every pair
of a call: one string of a pair is the bit-vector side (64 rows per uint64 word), the other is
scanned column by column. Three things keep the number of numpy calls per pair small:

- a wavefront over words: at step ``t`` word ``w`` works on column ``t - w``, so the carry and
  the shifted-out bits a word needs from the word above were made one step earlier and no step
  waits on a carry chain; one step is ~25 numpy calls on the ``[words, pairs]`` state;
- Ukkonen's band: only the words within ``band`` of the diagonal are computed (cells outside
  read upper bounds), which is exact whenever the distance is <= ``band``; a pair whose result
  exceeds its band runs again with twice the band, up to the full matrix;
- meet in the middle: a long pair is split at the middle column of its text; the last column
  of the first half (forward) and of the second half (both strings reversed) give
  ``D = min_i D(x[:i], y[:c]) + D(x[i:], y[c:])``, so the sequential steps halve.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_WORD = 64
_ONE = np.uint64(1)
_TOP = np.uint64(63)
_CHUNK_PAIRS = 512  # pairs run together (bounds the working set of one step; <= 2,048)
_SPLIT_COLUMNS = 256  # texts at least this long are split in two (meet in the middle)
_FAR = 1 << 40  # "no value": rows outside the band; sums of two stay far from overflow
_BAG_BUCKETS = 256  # character buckets of the band's first guess (`_first_bands`)
_PEQ_BOOL_BYTES = 1 << 26  # largest Peq table built as bools before packing (64 MiB)
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


def _last_column(patterns: list[np.ndarray], texts: list[np.ndarray], words: int,
                 band: int) -> np.ndarray:
    """``[N, 64 * words + 1]`` int64: row ``i`` of each pair's last column, ``D(pattern[:i],
    text)``, computed inside the diagonal band ``|i - j| <= band``; ``_FAR`` for rows the band
    does not reach there (rows past the pattern hold values of no use).

    patterns (the bit-vector side, rows ``i``) and texts (columns ``j``) are non-empty, the
    patterns fit ``words`` words. Word ``w`` (rows ``64w+1 .. 64w+64``) is only computed on
    the columns the band reaches; the cells outside read upper bounds (the row above the band
    grows by 1 per column, a word entering the band starts as +1 per row), so every value is
    >= the true one and equal to it when an optimal path to the cell stays inside the band
    (always when the value is <= ``band``). ``band >= max(len)`` is the full matrix.
    ``Peq[c]`` has bit ``i`` set where the pattern's character ``i`` is ``c``; characters are
    keyed per pair (``pair << 21 | code point``, uint32: at most 2,048 pairs) so one table
    serves the group.
    """
    n_pairs = len(patterns)
    lengths = np.array([len(p) for p in patterns])
    text_len = np.array([len(t) for t in texts])
    columns = int(text_len.max())
    # ---- Peq table over the group's (pair, character) keys, text characters included (their
    # rows stay zero where the pattern lacks them); row `n_keys` is all zeros (padding)
    pair_of = np.repeat(np.arange(n_pairs, dtype=np.uint32), lengths)
    text_pair = np.repeat(np.arange(n_pairs, dtype=np.uint32), text_len)
    keys = np.concatenate([(pair_of << np.uint32(21)) | np.concatenate(patterns),
                           (text_pair << np.uint32(21)) | np.concatenate(texts)])
    uniq, key_row = np.unique(keys, return_inverse=True)
    zero = len(uniq)
    rows_p, bit = key_row[:len(pair_of)], np.concatenate([np.arange(m) for m in lengths])
    if (zero + 1) * words * _WORD <= _PEQ_BOOL_BYTES:  # a bool table packed: fastest
        bits = np.zeros((zero + 1, words * _WORD), np.bool_)
        bits[rows_p, bit] = True
        peq = np.packbits(bits, axis=1, bitorder="little").view("<u8").astype(np.uint64)
    else:  # many distinct characters (CJK pages): OR the bits in, 1/8 of the memory
        peq = np.zeros((zero + 1, words), np.uint64)
        np.bitwise_or.at(peq, (rows_p, bit // _WORD), _ONE << (bit % _WORD).astype(np.uint64))
    # ---- texts left-aligned, `words` zero columns on either side (they read the zero row)
    row = np.full((n_pairs, words + columns + words), zero, np.int64)
    text_col = np.arange(len(text_pair)) - np.repeat(np.cumsum(text_len) - text_len, text_len)
    row[text_pair, words + text_col] = key_row[len(pair_of):]
    # wavefront: at step t word w works on column t - w, so a word's carry and shifted-out
    # bits come from the word above one step earlier and no step waits on a carry chain.
    # diag[t, w, p] = flat Peq index (row * words + w) of pair p's column t - w, word w.
    # State is word-major ([W, N]) so a step's words are one contiguous block
    total = columns + words - 1
    flat = (row * words).astype(np.int32 if peq.size < 2**31 else np.int64)
    window = np.lib.stride_tricks.sliding_window_view(flat, words, axis=1)
    diag = window[:, 1:total + 1, ::-1].transpose(1, 2, 0)  # [T, W, N]
    word_index = np.arange(words, dtype=flat.dtype)[:, None]
    peq_flat = peq.ravel()
    # ---- the band: word w covers columns first[w] .. last[w], i.e. steps first + w .. last + w;
    # both increase with w, so the words of a step are one range [lo, hi)
    w_all = np.arange(words)
    first = np.maximum(0, _WORD * w_all - band)
    last = np.minimum(columns - 1, _WORD * w_all + _WORD + band)
    steps = np.arange(total)
    lo_at = np.searchsorted(last + w_all, steps, side="left")   # words whose band ended: < lo
    hi_at = np.searchsorted(first + w_all, steps, side="right")  # words started: < hi
    # a word entering at column c > 0 starts from the word above's bottom row at column c - 1
    # (made 2 steps before its first) + 64: its rows start as +1 each
    seed_at = {int(first[w] + w - 2): w for w in range(1, words) if 0 < first[w] <= last[w]}
    # pair p's last column: word w has it after step n - 1 + w; kept for the words of the pair
    # that the band reaches there
    done_at: dict[int, tuple[list[int], list[int]]] = {}
    for p, (n, m) in enumerate(zip(text_len.tolist(), lengths.tolist())):
        for w in range(_words(m)):
            if first[w] <= n - 1 <= last[w]:
                pairs_w = done_at.setdefault(n - 1 + w, ([], []))
                pairs_w[0].append(p)
                pairs_w[1].append(w)

    vp = np.full((words, n_pairs), ~np.uint64(0))
    vn = np.zeros((words, n_pairs), np.uint64)
    # score[0] - score[1]: D at each word's bottom row (rows 64w + 64), its column so far;
    # the +1 and -1 steps are counted apart so one add serves both
    score = np.zeros((2, words, n_pairs), np.uint64)
    score[0] = np.arange(1, words + 1, dtype=np.uint64)[:, None] * np.uint64(_WORD)
    # what word w gets from the word above, made one step earlier: the carry of the addition
    # and the horizontal deltas [HP, HN] of the row between them (HP and HN share every shift
    # and OR, so they are one array); row `words` takes the last word's and is never read
    cin = np.zeros((words + 1, n_pairs), np.uint64)
    h_in, h_out = (np.zeros((2, words + 1, n_pairs), np.uint64) for _ in range(2))
    h_in[0, 0] = 1  # row 0 (and later the row above the band) is +1 per column
    boundary = np.array([[1], [0]], np.uint64)
    width = max(int((hi_at - lo_at).max()), 0)
    x, s, d0, tmp = (np.zeros((width, n_pairs), np.uint64) for _ in range(4))
    h = np.zeros((2, width, n_pairs), np.uint64)
    c1, c2 = np.zeros((width, n_pairs), np.bool_), np.zeros((width, n_pairs), np.bool_)
    kept = []  # (pairs, words, D at the bottom row, VP, VN) of words done with a last column
    for t, lo, hi in zip(range(total), lo_at.tolist(), hi_at.tolist()):
        if t % _EQ_BLOCK == 0:  # Eq words of the next block of steps, gathered at once
            stop = min(t + _EQ_BLOCK, total) - 1
            eq_lo, eq_hi = lo, int(hi_at[stop])
            eq = np.take(peq_flat, diag[t:stop + 1, eq_lo:eq_hi] + word_index[eq_lo:eq_hi])
        k = hi - lo
        if k <= 0:
            continue  # no word works on this step (only past every pair's last column)
        vp_w, vn_w, cin_w = vp[lo:hi], vn[lo:hi], cin[lo:hi]
        x_, s_, d0_, tmp_, c1_, c2_ = x[:k], s[:k], d0[:k], tmp[:k], c1[:k], c2[:k]
        h_ = h[:, :k]
        hp_, hn_ = h_
        np.bitwise_or(eq[t % _EQ_BLOCK, lo - eq_lo:hi - eq_lo], vn_w, out=x_)  # X = Eq | VN
        np.bitwise_and(x_, vp_w, out=s_)
        np.add(s_, vp_w, out=s_)                    # (X & VP) + VP, word by word ...
        np.less(s_, vp_w, out=c1_)                  # ... its carry out ...
        np.add(s_, cin_w, out=s_)                   # ... plus the carry in from the word above
        np.less(s_, cin_w, out=c2_)
        np.bitwise_or(c1_, c2_, out=cin[lo + 1:hi + 1], casting="unsafe")
        cin[lo] = 0
        np.bitwise_xor(s_, vp_w, out=d0_)
        np.bitwise_or(d0_, x_, out=d0_)             # D0
        np.bitwise_or(d0_, vp_w, out=tmp_)
        np.invert(tmp_, out=tmp_)
        np.bitwise_or(tmp_, vn_w, out=hp_)          # HP = VN | ~(D0 | VP)
        np.bitwise_and(d0_, vp_w, out=hn_)          # HN = D0 & VP
        # each word's bottom row: its horizontal delta (the score) and the next word's bits
        bottom = h_out[:, lo + 1:hi + 1]
        np.right_shift(h_, _TOP, out=bottom)
        score_w = score[:, lo:hi]
        np.add(score_w, bottom, out=score_w)
        h_out[:, lo] = boundary                     # the row above the band: +1 per column
        np.left_shift(h_, _ONE, out=h_)
        np.bitwise_or(h_, h_in[:, lo:hi], out=h_)
        h_in, h_out = h_out, h_in
        np.bitwise_or(d0_, hp_, out=tmp_)
        np.invert(tmp_, out=tmp_)
        np.bitwise_or(tmp_, hn_, out=vp_w)          # VP = HN << 1 | ~(D0 | HP << 1)
        np.bitwise_and(hp_, d0_, out=vn_w)          # VN = HP << 1 & D0
        if t in seed_at:
            w = seed_at[t]
            score[:, w] = score[:, w - 1]
            score[0, w] += np.uint64(_WORD)
        if t in done_at:
            p, w = done_at[t]
            kept.append((p, w, score[0, w, p] - score[1, w, p], vp[w, p], vn[w, p]))
    # D[64w + b + 1, n] = the word's bottom row minus the vertical deltas of the rows below b
    column = np.full((n_pairs, words * _WORD + 1), _FAR, np.int64)
    column[:, 0] = text_len  # D[0, n] = n
    if kept:
        p, w, bottom, vp_k, vn_k = (np.concatenate(a) for a in zip(*kept))
        delta = _bits(vp_k).astype(np.int64) - _bits(vn_k)  # [E, 64]: bit b = row 64w + b + 1
        below = delta.sum(axis=1, keepdims=True) - np.cumsum(delta, axis=1)
        rows = _WORD * w[:, None] + 1 + np.arange(_WORD)
        column[p[:, None], rows] = bottom.astype(np.int64)[:, None] - below
    return column


def _bits(words_: np.ndarray) -> np.ndarray:
    """``[E]`` uint64 -> ``[E, 64]`` uint8 bits, least significant first."""
    return np.unpackbits(words_.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1,
                         bitorder="little")


def levenshtein_batch(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Edit distances ``[N]`` int64 (insert / delete / substitute, cost 1) of ``a[i]`` vs ``b[i]``.

    All pairs run together (bit-parallel, see the module doc); exact for any Unicode strings.
    """
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} and {len(b)} strings")
    out = np.zeros(len(a), np.int64)
    todo: list[tuple[int, np.ndarray, np.ndarray, int]] = []
    for i, (s, t) in enumerate(zip(a, b)):
        x, y = _strip_common(_code_points(s), _code_points(t))
        if len(x) < len(y):
            x, y = y, x  # x (the longer) is the bit-vector side
        if len(y) == 0:
            out[i] = len(x)
            continue
        todo.append((i, x, y))
    todo = [(i, x, y, band) for (i, x, y), band in zip(todo, _first_bands(todo))]
    # a pair whose banded distance exceeds its band is run again with twice the band; the
    # band reaching len(x) is the full matrix, so every pair ends exact
    while todo:
        jobs = [job for _, x, y, band in todo for job in _jobs(x, y, band)]
        columns = _run_jobs(jobs)
        retry, k = [], 0
        for i, x, y, band in todo:
            if len(y) >= _SPLIT_COLUMNS:
                forward, backward = (_rows(columns[k + h], len(x) + 1) for h in (0, 1))
                k += 2
                d = int(np.min(forward + backward[::-1]))  # the middle column crossed at row i
            else:
                d = int(columns[k][len(x)])
                k += 1
            if d <= band or band >= len(x):
                out[i] = d
            else:
                retry.append((i, x, y, min(2 * band, len(x))))
        todo = retry
    return out


def _jobs(x: np.ndarray, y: np.ndarray, band: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """The (pattern, text, band) runs of one pair: itself, or its two halves when y is long.

    A path within the band crosses the middle column c at a row within ``band`` of c, so each
    half's pattern needs only its first ``c + band`` (forward) or ``len(y) - c + band``
    (reversed) characters.
    """
    if len(y) < _SPLIT_COLUMNS:
        return [(x, y, band)]
    c = len(y) // 2
    return [(x[:c + band], y[:c], band),
            (x[::-1][:len(y) - c + band], y[::-1][:len(y) - c], band)]


def _run_jobs(jobs: list[tuple[np.ndarray, np.ndarray, int]]) -> list[np.ndarray]:
    """Each job's last column, rows 0 .. len(pattern), in job order; jobs run in groups
    (`_chunks`)."""
    columns: list[np.ndarray] = [np.empty(0)] * len(jobs)
    for group in _chunks(jobs):
        band = max(jobs[j][2] for j in group)
        words = _words(max(len(jobs[j][0]) for j in group))
        column = _last_column([jobs[j][0] for j in group], [jobs[j][1] for j in group],
                              words, band)
        for row, j in enumerate(group):
            columns[j] = column[row, :len(jobs[j][0]) + 1]
    return columns


def _rows(column: np.ndarray, n: int) -> np.ndarray:
    """``column`` cut or padded with ``_FAR`` to ``n`` rows."""
    return np.concatenate([column[:n], np.full(max(0, n - len(column)), _FAR, np.int64)])


def _first_bands(pairs: list[tuple[int, np.ndarray, np.ndarray]]) -> list[int]:
    """The first band tried for each (index, x, y) pair (x the longer): three times a cheap
    lower bound of its distance plus a word, at least len(x) - len(y), at most len(x) (the
    full matrix). A noisy read of a page has a distance ~1.5-3 times the bound.

    The bound is the bag distance over characters hashed into `_BAG_BUCKETS` buckets:
    len(x) minus what the two share as multisets of buckets (each edit fixes at most one
    character; merging characters only raises what they share, so it stays a lower bound).
    Counted for all pairs at once.
    """
    if not pairs:
        return []
    x_len = np.array([len(x) for _, x, _ in pairs])
    y_len = np.array([len(y) for _, _, y in pairs])

    def histogram(strings: list[np.ndarray], lengths: np.ndarray) -> np.ndarray:
        pair = np.repeat(np.arange(len(pairs)), lengths)
        bucket = pair * _BAG_BUCKETS + np.concatenate(strings) % _BAG_BUCKETS
        return np.bincount(bucket, minlength=len(pairs) * _BAG_BUCKETS).reshape(len(pairs), -1)

    shared = np.minimum(histogram([x for _, x, _ in pairs], x_len),
                        histogram([y for _, _, y in pairs], y_len)).sum(axis=1)
    bag = x_len - shared
    return np.minimum(x_len, np.maximum(x_len - y_len, 3 * bag + _WORD)).tolist()


def _words(length: int) -> int:
    """64-row words a pattern of `length` characters needs."""
    return -(-length // _WORD)


def _chunks(jobs: list[tuple[np.ndarray, np.ndarray, int]]) -> list[list[int]]:
    """Job indices grouped to run together: sorted by band then size, a group's bands and words
    at most twice its first's, at most `_CHUNK_PAIRS` jobs."""
    order = sorted(range(len(jobs)), key=lambda j: (jobs[j][2], len(jobs[j][0]), len(jobs[j][1])))
    groups, lo = [], 0
    while lo < len(order):
        band, words = jobs[order[lo]][2], _words(len(jobs[order[lo]][0]))
        hi = lo + 1
        while (hi < len(order) and hi - lo < _CHUNK_PAIRS and jobs[order[hi]][2] <= 2 * band
               and _words(len(jobs[order[hi]][0])) <= 2 * words):
            hi += 1
        groups.append(order[lo:hi])
        lo = hi
    return groups


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
