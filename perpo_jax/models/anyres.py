"""LLaVA-NeXT / OneVision "anyres" geometry and feature packing, as transformers computes them.

One image of original size (oh, ow) becomes a base tile (the whole image resized) plus a
gh x gw grid of tiles of the best-fit resolution from `image_grid_pinpoints`. Its projected
tile features (pp x pp per tile) are laid out as one (gh*pp) x (gw*pp) feature grid, the
rows/columns the letterbox padding produced are cut off ("unpad"), OneVision shrinks a grid
larger than `anyres_max_N` tiles by bilinear interpolation, and an `image_newline` vector ends
every row. The prompt holds, per image,

    pp*pp (base) + rows * (cols + 1)

image tokens (see `image_token_count`).

Everything here is a pure function. The traced ones (`best_resolution`, `packed_layout`,
`pack_features`) take int32 image sizes that may be jit tracers: shapes stay static (the
longest packing any pinpoint can give), validity is a mask.

Exactness: transformers does this geometry in Python floats (IEEE double). Where its double
arithmetic differs from exact rational arithmetic we reproduce the double result:
- `int(c * (n / d))` in `select_best_resolution` is off by one below the exact value for some
  sizes (e.g. int(79 * (336 / 79)) == 335); `floor_mul_div` computes the double result with
  int32 arithmetic only (device-friendly, no float64);
- `int(round(x * (a / b), 7))` in `unpad_image` is the exact rational floor for any size
  below 10^7 pixels (the rounding to 7 decimals absorbs the double error), so integers do;
- OneVision's `x // sqrt(...)` depends only on the (bounded) unpadded grid size, so it is
  tabulated once on the host with Python floats (`_reduction_table`).
Integer products stay below 2**31 for image sides below 32768 pixels.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

MAX_SIDE = 32767  # image sides (pixels) for which the int32 geometry is exact


# ----------------------------------------------------------------------------- host-side, static


def parse_max_tiles(vision_aspect_ratio: str) -> int:
    """"anyres_max_9" -> 9, read the way transformers does (`str.strip("anyres_max_")`)."""
    digits = vision_aspect_ratio.strip("anyres_max_")
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not of the form "
                         "'anyres_max_N' with N >= 1")
    return int(digits)


def check_pinpoints(pinpoints, tile: int) -> tuple[tuple[int, int], ...]:
    """Pinpoints as ((H, W), ...) ints, each a positive multiple of the tile size."""
    out = tuple((int(h), int(w)) for h, w in pinpoints)
    if not out:
        raise ValueError("image_grid_pinpoints is empty")
    for h, w in out:
        if h <= 0 or w <= 0 or h % tile or w % tile:
            raise ValueError(f"image_grid_pinpoints entry [{h}, {w}] is not a positive multiple "
                             f"of the vision tower's image_size {tile}")
    return out


def max_tiles(pinpoints, tile: int) -> int:
    """Static tile count of the largest pinpoint, base tile included: pixel_values [B, N, ...]."""
    return 1 + max((h // tile) * (w // tile) for h, w in pinpoints)


def max_packed_length(pinpoints, tile: int, pp: int) -> int:
    """Longest packed feature sequence any image can give: base + rows * (cols + newline)."""
    return pp * pp + max((h // tile) * pp * ((w // tile) * pp + 1) for h, w in pinpoints)


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """transformers' `select_best_resolution`, verbatim in Python floats (the host reference)."""
    best, max_eff, min_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        dw, dh = int(width * scale), int(height * scale)
        eff = min(dw * dh, width * height)
        waste = w * h - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            max_eff, min_waste, best = eff, waste, (h, w)
    return best


def image_token_count(height: int, width: int, pinpoints, tile: int, pp: int,
                      max_tiles_kept: int | None = None) -> int:
    """Image tokens for one (height, width) image (host, Python ints/floats): transformers'
    LlavaNextProcessor / LlavaOnevisionProcessor `_get_number_of_features` for a tower giving
    pp*pp features per tile (base tile included, CLS already dropped)."""
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    rows, cols = unpadded_grid(height, width, (best_h // tile) * pp, (best_w // tile) * pp)
    if max_tiles_kept is not None:
        rows, cols = reduced_grid(rows, cols, max_tiles_kept, pp)
    return pp * pp + rows * (cols + 1)


def unpadded_grid(oh, ow, ch, cw):
    """(rows, cols) left of a ch x cw feature grid once the letterbox padding is cut off."""
    if ow * ch > cw * oh:  # original wider than the grid: padding above and below
        pad = (ch - (oh * cw) // ow) // 2
        return ch - 2 * pad, cw
    pad = (cw - (ow * ch) // oh) // 2
    return ch, cw - 2 * pad


@functools.lru_cache(maxsize=32)
def _reduction_table(max_n: int, pp: int, rows_max: int, cols_max: int) -> np.ndarray:
    """[2, rows_max+1, cols_max+1] int32: OneVision's grid size after `anyres_max_N`.

    Entry [:, r, c] is (int(r // ratio), int(c // ratio)) when ratio = sqrt(r*c / (N*pp^2))
    exceeds 1.1, else (r, c); computed in Python floats exactly as transformers does.
    """
    table = np.zeros((2, rows_max + 1, cols_max + 1), np.int32)
    for r in range(1, rows_max + 1):
        for c in range(1, cols_max + 1):
            table[:, r, c] = reduced_grid(r, c, max_n, pp)
    return table


def reduced_grid(rows: int, cols: int, max_n: int, pp: int) -> tuple[int, int]:
    """OneVision's `anyres_max_N` grid size, in Python floats as transformers computes it."""
    ratio = math.sqrt(rows * cols / (max_n * pp**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def reduction_table(pinpoints, tile: int, pp: int, max_n: int) -> np.ndarray:
    """`_reduction_table` sized for the largest feature grid of `pinpoints`."""
    rows_max = max(h // tile for h, _ in pinpoints) * pp
    cols_max = max(w // tile for _, w in pinpoints) * pp
    return _reduction_table(max_n, pp, rows_max, cols_max)


# ----------------------------------------------------------------------------- traced (int32)


def _bit_length(x):
    """Bits of positive int32 x (floor(log2 x) + 1)."""
    return 32 - lax.clz(jnp.asarray(x, jnp.int32))


def floor_mul_div(c, n, d):
    """int(c * (n / d)) as IEEE double arithmetic gives it, for int32 arrays 1 <= c, n, d.

    The exact value c*n/d floors exactly unless it is an integer K; then the double result is
    K - 1 iff n/d was rounded down and the product's error reaches half an ulp below K. With
    q* = n/d in [2^eq, 2^(eq+1)), R = n * 2^(52-eq) mod d is the part of q* below the 53-bit
    mantissa (in units of ulp(q)/d); q rounds down iff 2R < d, and c*(q - q*) = -(c*R/d)*ulp(q)
    with c*R/d an integer j. fl(K - j*ulp(q)) < K iff j*2^(eq-52) exceeds half the spacing
    below K: 2^(eK-53), or 2^(eK-54) when K is a power of two (ties go to the even K).
    Requires c*n, c*d, d*d, n * 2^15 < 2^31.
    """
    c, n, d = (jnp.asarray(v, jnp.int32) for v in (c, n, d))
    num = c * n
    k = num // d
    exact = (num % d) == 0
    e0 = _bit_length(n) - _bit_length(d)
    up = jnp.maximum(-e0, 0)
    down = jnp.maximum(e0, 0)
    eq = jnp.where((n << up) >= (d << down), e0, e0 - 1)
    steps = 52 - eq  # < 128 for the sizes allowed
    power, base = jnp.ones_like(d) % d, 2 % d  # 2^steps mod d, square-and-multiply
    for bit in range(7):
        power = jnp.where((steps >> bit) & 1, (power * base) % d, power)
        base = (base * base) % d
    r = ((n % d) * power) % d
    rounded_down = (2 * r < d) & (r > 0)
    j = (c * r) // d
    kk = jnp.maximum(k, 1)
    ek = _bit_length(kk) - 1
    pow2 = (kk & (kk - 1)) == 0
    t = ek - eq - jnp.where(pow2, 2, 1)
    beyond = jnp.where(t < 0, j >= 1, j > (jnp.int32(1) << jnp.clip(t, 0, 30)))
    return k - (exact & rounded_down & beyond & (k > 0)).astype(jnp.int32)


def best_resolution(image_sizes, pinpoints):
    """image_sizes [..., 2] int (height, width) -> best (height, width) [..., 2] int32.

    transformers' `select_best_resolution` with traced sizes: scale by the tighter side (ties:
    the width, as Python's min returns its first argument), effective = min(dw*dh, h*w),
    wasted = H*W - effective; its loop keeps the first pinpoint maximising effective, then
    minimising waste, which is what the lexicographic choice below computes (over [..., P]).
    """
    sizes = jnp.asarray(image_sizes, jnp.int32)
    oh, ow = sizes[..., 0, None], sizes[..., 1, None]  # [..., 1]
    pins = jnp.asarray(pinpoints, jnp.int32)  # [P, 2]
    h, w = pins[:, 0], pins[:, 1]
    big = jnp.int32(2**31 - 1)
    area = jnp.where(ow <= big // jnp.maximum(oh, 1), oh * ow, big)
    by_width = w * oh <= h * ow  # w/ow <= h/oh, exactly as the doubles compare
    num, den = jnp.where(by_width, w, h), jnp.where(by_width, ow, oh)
    dw = floor_mul_div(jnp.broadcast_to(ow, num.shape), num, den)
    dh = floor_mul_div(jnp.broadcast_to(oh, num.shape), num, den)
    eff = jnp.minimum(dw * dh, area)  # [..., P]
    waste = h * w - eff
    top = eff == eff.max(axis=-1, keepdims=True)
    waste = jnp.where(top, waste, big)
    first = jnp.argmax(top & (waste == waste.min(axis=-1, keepdims=True)), axis=-1)
    return pins[first]


def packed_layout(image_sizes, pinpoints, tile: int, pp: int, table=None) -> dict:
    """Per-image geometry [B] int32 of the packed features (traced image_sizes [B, 2]).

    Returns tiles (base + grid tiles used), grid_w (tiles per grid row), top / left (first kept feature row / column of the
    full (gh*pp) x (gw*pp) grid), rows / cols (the unpadded grid), out_rows / out_cols (after
    OneVision's reduction `table`, else the unpadded grid) and length = pp*pp +
    out_rows * (out_cols + 1), the image-token count.
    """
    sizes = jnp.asarray(image_sizes, jnp.int32)
    oh, ow = sizes[:, 0], sizes[:, 1]
    best = best_resolution(sizes, pinpoints)
    gh, gw = best[:, 0] // tile, best[:, 1] // tile
    ch, cw = gh * pp, gw * pp
    wide = ow * ch > cw * oh
    pad_rows = jnp.where(wide, (ch - (oh * cw) // ow) // 2, 0)
    pad_cols = jnp.where(wide, 0, (cw - (ow * ch) // oh) // 2)
    rows, cols = ch - 2 * pad_rows, cw - 2 * pad_cols
    if table is None:
        out_rows, out_cols = rows, cols
    else:
        table = jnp.asarray(table)
        out_rows, out_cols = table[0, rows, cols], table[1, rows, cols]
    return dict(tiles=1 + gh * gw, grid_w=gw, top=pad_rows, left=pad_cols, rows=rows, cols=cols,
                out_rows=out_rows, out_cols=out_cols,
                length=pp * pp + out_rows * (out_cols + 1))


def _interp_axis(out_index, n_in, n_out, reduce):
    """torch bilinear (align_corners=False) source index pair and weight along one axis.

    out_index [B, L], n_in / n_out [B, 1] -> (i0, i1, lam1) [B, L]; float32 as torch's CPU
    kernel computes scale = in / out, src = max(scale * (i + 0.5) - 0.5, 0). Where `reduce`
    is False the index maps to itself with weight 0 on the neighbour (no interpolation).
    """
    scale = n_in.astype(jnp.float32) / jnp.maximum(n_out, 1).astype(jnp.float32)
    src = jnp.maximum(scale * (out_index.astype(jnp.float32) + 0.5) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
    lam = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    i1 = i0 + (i0 < n_in - 1).astype(jnp.int32)
    return (jnp.where(reduce, i0, out_index), jnp.where(reduce, i1, out_index),
            jnp.where(reduce, lam, 0.0))


def pack_features(tile_feats, newline, layout: dict, max_length: int, pp: int,
                  interpolate: bool):
    """Tile features -> packed per-image sequences, padded to a static length.

    tile_feats [B, N, pp*pp, D] (tile 0 the base image, tiles 1.. the grid row-major),
    newline [D], layout from `packed_layout` ([B] each). Returns (packed [B, Lmax, D] in
    float32, valid [B, Lmax] bool): base features, then each grid row followed by `newline`;
    `interpolate` applies OneVision's bilinear reduction (else rows/cols are taken as is).
    """
    b, n, p, d = tile_feats.shape
    flat = tile_feats.reshape(b, n * p, d).astype(jnp.float32)
    col = lambda name: layout[name][:, None]  # noqa: E731  [B] -> [B, 1]
    j = jnp.arange(max_length, dtype=jnp.int32)[None, :]
    m = jnp.maximum(j - p, 0)
    width = col("out_cols") + 1
    r, c = m // width, m % width
    is_newline = c == col("out_cols")

    def grid_index(y, x):
        """Row y, column x of the unpadded grid -> flat tile-feature index [B, L]."""
        y, x = y + col("top"), x + col("left")
        tile = 1 + (y // pp) * col("grid_w") + x // pp
        return jnp.clip(tile * p + (y % pp) * pp + x % pp, 0, n * p - 1)

    def take(index):
        return jnp.take_along_axis(flat, index[..., None], axis=1)

    if interpolate:
        reduce = (col("out_rows") != col("rows")) | (col("out_cols") != col("cols"))
        y0, y1, ly = _interp_axis(r, col("rows"), col("out_rows"), reduce)
        x0, x1, lx = _interp_axis(jnp.minimum(c, col("out_cols") - 1), col("cols"),
                                  col("out_cols"), reduce)
        ly, lx = ly[..., None], lx[..., None]
        # torch's order: interpolate along the width inside, then along the height
        top = (1.0 - lx) * take(grid_index(y0, x0)) + lx * take(grid_index(y0, x1))
        bottom = (1.0 - lx) * take(grid_index(y1, x0)) + lx * take(grid_index(y1, x1))
        grid = (1.0 - ly) * top + ly * bottom
    else:
        grid = take(grid_index(r, jnp.minimum(c, col("out_cols") - 1)))
    base = take(jnp.broadcast_to(jnp.minimum(j, p - 1), (b, max_length)))
    packed = jnp.where(is_newline[..., None], newline.astype(jnp.float32)[None, None], grid)
    packed = jnp.where((j < p)[..., None], base, packed)
    return packed, j < col("length")


def scatter_features(embeds, is_image, packed, valid):
    """Writes the valid packed features into the image-token positions, in order.

    embeds [B, T, D], is_image [B, T] bool, packed [B, L, D], valid [B, L] (a prefix of each
    row). The k-th image token of the flattened batch takes the k-th valid feature of the
    flattened images (torch `masked_scatter`), so image b fills the tokens of row b when each
    row holds its own image's count.
    """
    lengths = valid.sum(axis=1).astype(jnp.int32)
    ends = jnp.cumsum(lengths)
    order = jnp.cumsum(is_image.reshape(-1)) - 1  # [B*T] rank among image tokens
    image = jnp.searchsorted(ends, order, side="right")
    image = jnp.clip(image, 0, packed.shape[0] - 1)
    starts = ends - lengths
    pos = jnp.clip(order - starts[image], 0, packed.shape[1] - 1)
    feats = packed[image, pos].reshape(embeds.shape).astype(embeds.dtype)
    return jnp.where(is_image[..., None], feats, embeds)
