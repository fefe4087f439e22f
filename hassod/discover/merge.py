"""Stage 1, step 1: hierarchical adaptive clustering of a patch-feature grid (docs/design.md §4).

Every patch of an (h, w) grid starts as its own region; regions touching by a
side (4-connectivity) are neighbours. A region's feature is its summed patch
features; two regions' similarity is the cosine of those sums, accumulated in
float64 (region sums stay in the features' dtype). The globally most similar
neighbouring pair is merged, again and again, while its similarity is at least
the threshold. Thresholds are taken from high to low and merging carries over,
so each threshold yields a coarser partition of the same grid.

Ties are decided exactly, as the quadratic test oracle (``tests/oracles.py``)
decides them: a similarity is rounded to a multiple of ``2**-32`` before it is
compared, equal ones are broken by the smallest ``(min id, max id)``, a region's
id being the raster index of its first patch; a zero sum has similarity 0 to
everything. The algorithm (bounded heaps, O(n log n)) and its measured cost are
in docs/benchmarks.md, "Merge".
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numba
import numpy as np

# Similarities are compared as integers: round(similarity * SIMILARITY_SCALE).
SIMILARITY_SCALE = float(2**32)

# Thresholds are clipped to this range before scaling: a cosine lies in
# [-1, 1], so clipping changes no decision and keeps the scaled value finite.
_THRESHOLD_CLIP = 2.0

# Heap rows are 4 int64 columns (32 bytes: the heaps are cache-miss bound),
# ordered by column 0 descending, then column 1 (pair code) ascending.
# Local heap of region r: (score - drift[r] at push, pair code, other region,
#     other region's version << 32 | r's version, both at push).
# Global heap: (2 * bound + 1 if inexact: inexact bounds come first on ties,
#     pair code, region, token).
_KEY, _CODE, _A, _B = 0, 1, 2, 3
_LOW32 = (1 << 32) - 1

# fastmath reassociation is what vectorises the float64 sums; "no NaN / no
# inf" is left out so that NaN inputs still propagate to the check.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def hierarchical_merge(features: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Partition a patch grid by hierarchical adaptive clustering.

    features: (h, w, C) float array of patch features (float32 or float64;
        numpy, channels last: convert torch (C, h, w) tensors before calling).
    thresholds: cosine-similarity thresholds, in any order; duplicates allowed.

    Returns (T, h, w) int32 label maps, one per threshold in DESCENDING
    threshold order (finest partition first). Labels of each map are
    consecutive 0..k-1 numbered by first appearance in raster order, so equal
    partitions compare equal with ``np.array_equal``. Each label is one
    4-connected region and each map's regions are unions of the previous map's.
    """
    feats = np.asarray(features)
    if feats.ndim != 3:
        raise ValueError(f"features must be (h, w, C), got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise TypeError(f"features must be a float array, got {feats.dtype}")
    h, w, c = feats.shape
    if h == 0 or w == 0:
        raise ValueError(f"features must have a non-empty grid, got shape {feats.shape}")
    levels = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if levels.size == 0:
        raise ValueError("at least one threshold is needed")
    if not np.isfinite(levels).all():
        raise ValueError(f"thresholds must be finite, got {list(thresholds)}")
    levels = -np.sort(-levels)
    # ceil(theta * scale) is the smallest integer score that passes theta.
    min_scores = np.ceil(np.clip(levels, -_THRESHOLD_CLIP, _THRESHOLD_CLIP) * SIMILARITY_SCALE)
    dtype = np.float64 if feats.dtype == np.float64 else np.float32
    n = h * w
    flat = np.ascontiguousarray(feats.reshape(n, c), dtype=dtype)
    sums = _scratch("sums", n * c, dtype)[: n * c].reshape(n, c)
    # The arenas start large enough for all maps seen so far; when one fills
    # up, the merge starts over with a larger one (same result).
    min_scores = min_scores.astype(np.int64)
    nbrs_rows, local_rows = _NBRS_ROWS * n, _LOCAL_ROWS * n
    while True:
        nbrs, local = _arena("nbrs", nbrs_rows, 2), _arena("local", local_rows, 4)
        labels, status, rows = _merge_grid(flat, h, w, min_scores, sums, nbrs, local)
        if status == _NBRS_FULL:
            nbrs_rows = rows
        elif status == _LOCAL_FULL:
            local_rows = rows
        else:
            break
    if status == _NOT_FINITE:
        raise ValueError("features contain NaN or infinite values")
    return labels.reshape(len(levels), h, w)


# Per-thread scratch memory for the (n, C) region sums and the arenas, kept
# between calls: the page faults of a fresh 11-22 MB allocation of sums cost
# as much as the whole merge (docs/benchmarks.md, "Merge").
_SCRATCH = threading.local()

# Arena rows per patch to start with, above what merges of photo-like maps
# use (docs/benchmarks.md, "Merge").
_NBRS_ROWS = 12
_LOCAL_ROWS = 16

# Merge outcomes (_merge_loop).
_DONE, _NOT_FINITE, _NBRS_FULL, _LOCAL_FULL = 0, 1, 2, 3


def _scratch(key: str, size: int, dtype: type) -> np.ndarray:
    """A 1-d array of at least ``size`` elements: this thread's scratch
    buffer ``key`` for ``dtype`` (contents undefined)."""
    held = getattr(_SCRATCH, "held", None)
    if held is None:
        held = _SCRATCH.held = {}
    buffer = held.get((key, np.dtype(dtype)))
    if buffer is None or buffer.size < size:
        buffer = held[key, np.dtype(dtype)] = np.empty(size, dtype)
    return buffer


def _arena(key: str, rows: int, cols: int) -> np.ndarray:
    """(at least rows, cols) int64 scratch arena: all of buffer ``key``."""
    buffer = _scratch(key, rows * cols, np.int64)
    return buffer[: buffer.size - buffer.size % cols].reshape(-1, cols)


# --------------------------------------------------------------------------
# Reference counting. In numba's default mode every array that a compiled
# function receives as an argument, slices or assigns to a variable gets
# reference-count updates (calls to NRT_incref / NRT_decref, which LLVM cannot
# inline or prune around loops): with some two dozen of them per re-scored pair
# they took a large share of the merge loop (docs/benchmarks.md, "Merge").
# Everything that _merge_grid calls is therefore
# compiled without the runtime (``_nrt=False``: no counting at all), which
# numba only allows for code that allocates nothing and returns no new array;
# _merge_grid allocates and owns every array they use.


# --------------------------------------------------------------------------
# Vector arithmetic. A region's vector is its patch feature row (``flat``)
# until it first merges, then its row of ``sums`` (same dtype); ``inv`` holds
# 1 / its norm (0 for a zero vector). Products and sums of products are
# float64; fastmath only reorders them (relative error ~1e-16), far below the
# 2**-32 rounding of scores.


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, _nrt=False)
def _dot_rows(first, i, second, j):
    """first[i] . second[j] in float64, indexing the 2-d arrays directly."""
    acc = 0.0
    for k in range(first.shape[1]):
        acc += np.float64(first[i, k]) * np.float64(second[j, k])
    return acc


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, _nrt=False)
def _row_products(flat, j, up, left):
    """(flat[j] . flat[j], flat[j] . flat[up], flat[j] . flat[left]): the
    start-up pass reads and converts each row once for all three."""
    sq = 0.0
    dot_up = 0.0
    dot_left = 0.0
    for k in range(flat.shape[1]):
        value = np.float64(flat[j, k])
        sq += value * value
        dot_up += value * np.float64(flat[up, k])
        dot_left += value * np.float64(flat[left, k])
    return sq, dot_up, dot_left


@numba.njit(cache=True, nogil=True, _nrt=False)
def _rounded_score(dot, inv_a, inv_b):
    """round(2**32 * cosine) as int64, from a dot product and inverse norms."""
    return np.int64(np.floor(dot * inv_a * inv_b * 4294967296.0 + 0.5))


@numba.njit(cache=True, nogil=True, _nrt=False)
def _score(flat, sums, summed, inv, a, b):
    """round(2**32 * cosine(a, b)) as int64."""
    if summed[a]:
        dot = _dot_rows(sums, a, sums, b) if summed[b] else _dot_rows(sums, a, flat, b)
    else:
        dot = _dot_rows(flat, a, sums, b) if summed[b] else _dot_rows(flat, a, flat, b)
    return _rounded_score(dot, inv[a], inv[b])


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, _nrt=False)
def _dots4(u, v0, v1, v2, v3):
    """(u . v0, u . v1, u . v2, u . v3) in float64, in one pass: u is read
    and converted once, and four rows stream from memory at the same time
    (faster per product than four calls of _dot_rows)."""
    d0 = 0.0
    d1 = 0.0
    d2 = 0.0
    d3 = 0.0
    for k in range(u.shape[0]):
        x = np.float64(u[k])
        d0 += x * np.float64(v0[k])
        d1 += x * np.float64(v1[k])
        d2 += x * np.float64(v2[k])
        d3 += x * np.float64(v3[k])
    return d0, d1, d2, d3


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, _nrt=False)
def _dots2(u, v0, v1):
    """(u . v0, u . v1), like _dots4."""
    d0 = 0.0
    d1 = 0.0
    for k in range(u.shape[0]):
        x = np.float64(u[k])
        d0 += x * np.float64(v0[k])
        d1 += x * np.float64(v1[k])
    return d0, d1


@numba.njit(cache=True, nogil=True, _nrt=False)
def _score_batch(flat, sums, summed, inv, a, others, scores, count):
    """scores[e] = _score(..., a, others[e]) for e < count <= 4 (with 3, the
    last pair is scored twice)."""
    if count == 1:
        scores[0] = _score(flat, sums, summed, inv, a, others[0])
        return
    # Rows are selected inline: a helper returning a row view needs the runtime.
    b0, b1 = others[0], others[min(1, count - 1)]
    u = sums[a] if summed[a] else flat[a]
    v0 = sums[b0] if summed[b0] else flat[b0]
    v1 = sums[b1] if summed[b1] else flat[b1]
    if count == 2:
        d0, d1 = _dots2(u, v0, v1)
        scores[0] = _rounded_score(d0, inv[a], inv[b0])
        scores[1] = _rounded_score(d1, inv[a], inv[b1])
        return
    b2, b3 = others[min(2, count - 1)], others[min(3, count - 1)]
    v2 = sums[b2] if summed[b2] else flat[b2]
    v3 = sums[b3] if summed[b3] else flat[b3]
    d0, d1, d2, d3 = _dots4(u, v0, v1, v2, v3)
    for e, dot in enumerate((d0, d1, d2, d3)):
        if e < count:
            scores[e] = _rounded_score(dot, inv[a], inv[others[e]])


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, _nrt=False)
def _add_rows(old, extra, out):
    """out = old + extra, rounded to the arrays' dtype; ``out`` must not
    overlap ``old`` (see _add_in_place). Returns the float64 sums
    (old . old, old . out, out . out)."""
    before = 0.0
    cross = 0.0
    after = 0.0
    for k in range(out.shape[0]):
        value = old[k] + extra[k]
        out[k] = value
        b, a = np.float64(old[k]), np.float64(value)
        before += b * b
        cross += b * a
        after += a * a
    return before, cross, after


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, _nrt=False)
def _add_in_place(acc, extra):
    """_add_rows(acc, extra, acc). A separate loop because with two names for
    one row LLVM's runtime alias check fails and falls back to a scalar loop
    with a serial float64 sum (several times slower)."""
    before = 0.0
    cross = 0.0
    after = 0.0
    for k in range(acc.shape[0]):
        b = np.float64(acc[k])
        value = acc[k] + extra[k]
        acc[k] = value
        a = np.float64(value)
        before += b * b
        cross += b * a
        after += a * a
    return before, cross, after


@numba.njit(cache=True, nogil=True, _nrt=False)
def _absorb(flat, sums, summed, inv, keep, gone):
    """Region ``keep`` takes over ``gone``'s patches: update its sum (one pass)
    and inverse norm; returns an upper bound on how far its unit vector moved.

    With u = S * inv_old and u' = S' * inv_new, |u' - u|^2 is expanded into
    the three sums of the pass (instead of a second pass to measure it and a
    third to store: docs/benchmarks.md, "Merge"). The expansion
    cancels (its terms are ~1, the result can be ~0), so the bound adds the
    float64 error of the three sums (in any order, at most (C + 1) 2**-53
    times the sum of |terms|, ~1, ~1 and ~2 here) and of the expansion itself:
    at most (4 C + 28) 2**-53 in all, covered by 5 (C + 8) 2**-53. Its square
    root, ~7e-7 at C=768, loosens the bounds by ~3000 units of 2**-32 per
    merge, far below typical movements (~1e-3)."""
    extra = sums[gone] if summed[gone] else flat[gone]
    if summed[keep]:
        before, cross, after = _add_in_place(sums[keep], extra)
    else:
        before, cross, after = _add_rows(flat[keep], extra, sums[keep])
    summed[keep] = True
    inv_old = inv[keep]
    inv_new = 1.0 / np.sqrt(after) if after > 0.0 else 0.0
    inv[keep] = inv_new
    square = inv_old * inv_old * before + inv_new * inv_new * after - 2.0 * inv_old * inv_new * cross
    error = 5.0 * (flat.shape[1] + 8) * 2.0**-53
    return np.sqrt(max(square + error, 0.0))


@numba.njit(cache=True, nogil=True, _nrt=False)
def _drift_units(moved):
    """Integer bound on how far any score can move when a unit vector moves by
    ``moved`` (Cauchy-Schwarz): the margins cover float error in ``moved`` and
    in both scores, rounding of both scores (1), and one unit more so that
    inexact bounds are strictly above the true score."""
    return np.int64(np.ceil((moved * (1.0 + 1e-6) + 1e-12) * 4294967296.0)) + 2


def _heap_jit(signature: str):
    """Compile a heap helper for exactly ``signature``. Without one, numba
    compiles a helper again for every pattern of constant arguments at its
    call sites (``_place_down(heap, 0, 0, ...)`` is typed ``Literal[int](0)``),
    which adds to the compile time of every worker's first merge
    (docs/benchmarks.md, "Merge")."""
    return numba.njit(signature, cache=True, nogil=True, _nrt=False)


# --------------------------------------------------------------------------
# Binary heaps over rows of a (capacity, 4) int64 array. A heap is the rows
# ``o .. o + size - 1`` of its array; functions take the offset ``o`` and index
# the array directly (from when every view cost two reference-count updates).


@_heap_jit("boolean(int64[:, ::1], int64, int64)")
def _before(heap, i, j):
    """Whether absolute row i comes before row j."""
    return heap[i, _KEY] > heap[j, _KEY] or (heap[i, _KEY] == heap[j, _KEY] and heap[i, _CODE] < heap[j, _CODE])


@_heap_jit("void(int64[:, ::1], int64, int64, int64, int64, int64)")
def _set_row(heap, row, key, code, a, b):
    heap[row, _KEY], heap[row, _CODE], heap[row, _A], heap[row, _B] = key, code, a, b


@_heap_jit("void(int64[:, ::1], int64, int64)")
def _copy_row(heap, dst, src):
    heap[dst, _KEY], heap[dst, _CODE], heap[dst, _A], heap[dst, _B] = (
        heap[src, _KEY],
        heap[src, _CODE],
        heap[src, _A],
        heap[src, _B],
    )


@_heap_jit("void(int64[:, ::1], int64, int64, int64, int64, int64, int64)")
def _place_up(heap, o, pos, key, code, a, b):
    """Put the row (key, code, a, b) into the hole at ``pos``, moving it up."""
    while pos > 0:
        up = (pos - 1) >> 1
        if not (key > heap[o + up, _KEY] or (key == heap[o + up, _KEY] and code < heap[o + up, _CODE])):
            break
        _copy_row(heap, o + pos, o + up)
        pos = up
    _set_row(heap, o + pos, key, code, a, b)


@_heap_jit("void(int64[:, ::1], int64, int64, int64, int64, int64, int64, int64)")
def _place_down(heap, o, pos, size, key, code, a, b):
    """Put the row (key, code, a, b) into the hole at ``pos``, moving it down."""
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _before(heap, o + child + 1, o + child):
            child += 1
        if not (heap[o + child, _KEY] > key or (heap[o + child, _KEY] == key and heap[o + child, _CODE] < code)):
            break
        _copy_row(heap, o + pos, o + child)
        pos = child
    _set_row(heap, o + pos, key, code, a, b)


@_heap_jit("void(int64[:, ::1], int64, int64, int64)")
def _sift_down(heap, o, pos, size):
    _place_down(heap, o, pos, size, heap[o + pos, _KEY], heap[o + pos, _CODE], heap[o + pos, _A], heap[o + pos, _B])


@_heap_jit("void(int64[:, ::1], int64, int64, int64, int64, int64, int64)")
def _replace_top(heap, o, size, key, code, a, b):
    """Replace the top row by (key, code, a, b) and restore heap order."""
    _place_down(heap, o, 0, size, key, code, a, b)


@_heap_jit("int64(int64[:, ::1], int64, int64)")
def _pop(heap, o, size):
    """Remove the top row; returns the new size."""
    size -= 1
    if size > 0:
        last = o + size
        _place_down(heap, o, 0, size, heap[last, _KEY], heap[last, _CODE], heap[last, _A], heap[last, _B])
    return size


@_heap_jit("int64(int64[:, ::1], int64)")
def _rival(heap, size):
    """Index of the better child of the root, or 0 if the root has none
    (the global heap, offset 0)."""
    if size < 2:
        return 0
    if size > 2 and _before(heap, 2, 1):
        return 2
    return 1


# --------------------------------------------------------------------------
# Per-region segments (neighbour lists, local heaps) packed into arenas


@numba.njit(cache=True, nogil=True, _nrt=False)
def _room(arena, end, start, length, cap, region, extra):
    """Make room for ``extra`` more rows in a region's arena segment, moving it
    to the end of the arena if needed. Returns (new end, 0), or (end, rows)
    when the arena is full: the merge needs one of that many rows."""
    need = length[region] + extra
    if need <= cap[region]:
        return end, 0
    new_cap = max(2 * cap[region], need)
    if end + new_cap > arena.shape[0]:
        return end, max(2 * arena.shape[0], end + new_cap)
    first = start[region]
    for row in range(length[region]):
        for col in range(arena.shape[1]):
            arena[end + row, col] = arena[first + row, col]
    start[region], cap[region] = end, new_cap
    return end + new_cap, 0


@_heap_jit("void(int64[:, ::1], int64[::1], int64[::1], int64, int64, int64, int64, int64, int64)")
def _local_push(local, start, length, region, key, code, other, other_version, own_version):
    _place_up(local, start[region], length[region], key, code, other, (other_version << 32) | own_version)
    length[region] += 1


@numba.njit(cache=True, nogil=True, _nrt=False)
def _valid(heap, row, alive, version):
    """Whether a local entry's other region is unchanged since the push."""
    other = heap[row, _A]
    return alive[other] and version[other] == heap[row, _B] >> 32


@numba.njit(cache=True, nogil=True, _nrt=False)
def _clean_top(local, start, length, region, alive, version):
    """Drop entries at the top of a local heap whose other region has changed."""
    o = start[region]
    while length[region] > 0 and not _valid(local, o, alive, version):
        length[region] = _pop(local, o, length[region])


@numba.njit(cache=True, nogil=True, _nrt=False)
def _compact(local, start, length, region, alive, version):
    """Keep only the valid entries of a local heap and restore heap order."""
    o = start[region]
    kept = 0
    for i in range(length[region]):
        if _valid(local, o + i, alive, version):
            if kept != i:
                _copy_row(local, o + kept, o + i)
            kept += 1
    length[region] = kept
    for pos in range(kept // 2 - 1, -1, -1):
        _sift_down(local, o, pos, kept)


@numba.njit(cache=True, nogil=True, _nrt=False)
def _pick_batch(local, o, size, r, alive, version, drift, glob, rival, where):
    """Heap positions to re-score together: the top (0), then up to 3 of the
    next 6 positions whose entries are valid, inexact and could beat the
    rival. Returns their count; positions increase."""
    where[0] = 0
    count = 1
    for pos in range(1, min(7, size)):
        row = o + pos
        if (
            (local[row, _B] & _LOW32) != version[r]
            and _valid(local, row, alive, version)
            and (rival == 0 or 2 * (local[row, _KEY] + drift[r]) + 1 >= glob[rival, _KEY])
        ):
            where[count] = pos
            count += 1
            if count == 4:
                break
    return count


# --------------------------------------------------------------------------
# The merge loop


@numba.njit(cache=True, nogil=True, _nrt=False)
def _find(parent, r):
    while parent[r] != r:
        parent[r] = parent[parent[r]]  # path halving
        r = parent[r]
    return r


@numba.njit(cache=True, nogil=True, _nrt=False)
def _label_map(parent, out, t, relabel):
    """Write raster-order consecutive labels of the current partition to out[t]
    (relabel: (n,) int32 scratch)."""
    n = parent.shape[0]
    relabel[:] = -1
    count = 0
    for i in range(n):
        r = _find(parent, i)
        if relabel[r] < 0:
            relabel[r] = count
            count += 1
        out[t, i] = relabel[r]


@numba.njit(cache=True, nogil=True, _nrt=False)
def _union_neighbours(nbrs, start, length, keep, gone, parent, version, tick, seen, slot, merged):
    """Neighbours of the union of ``keep`` and ``gone`` (already linked in
    ``parent``), each once, into ``merged`` rows (region, stamp); returns
    their count. The stamp is the neighbour's version if keep's local heap
    still holds a valid entry for it, else -1 (it must be scored)."""
    count = 0
    for owner in (keep, gone):
        for e in range(start[owner], start[owner] + length[owner]):
            named = nbrs[e, 0]
            nb = _find(parent, named)
            if nb == keep:
                continue
            valid = owner == keep and named == nb and nbrs[e, 1] == version[nb]
            if seen[nb] != tick:
                seen[nb] = tick
                slot[nb] = count
                merged[count, 0] = nb
                merged[count, 1] = version[nb] if valid else -1
                count += 1
            elif valid:
                merged[slot[nb], 1] = version[nb]
    return count


@numba.njit(cache=True, nogil=True)
def _merge_grid(flat, h, w, min_scores, sums, nbrs, local):
    """flat: (h*w, C) patch features in raster order; min_scores: (T,) integer
    thresholds, descending; sums: scratch like ``flat``; nbrs, local: (>= 4 h*w,
    2) and (>= 4 h*w, 4) int64 scratch arenas.
    Returns ((T, h*w) int32 labels, outcome, rows): the outcome is _DONE,
    _NOT_FINITE, or _NBRS_FULL / _LOCAL_FULL when that arena needs ``rows``
    rows (then the labels are incomplete)."""
    n = flat.shape[0]
    out = np.zeros((min_scores.shape[0], n), np.int32)
    inv = np.empty(n, np.float64)
    summed = np.zeros(n, np.bool_)
    parent = np.arange(n)
    alive = np.ones(n, np.bool_)
    ident = np.arange(n)  # smallest patch index: the id used by the tie-break
    version = np.zeros(n, np.int64)  # global tick of the region's last change
    drift = np.zeros(n, np.int64)
    token = np.zeros(n, np.int64)  # current global-heap entry of each region
    # Neighbour lists: (neighbour, its version when our local heap last got a
    # valid entry for it, or -1). Local heaps: rows as described above. Both
    # are arenas of per-region segments, 4 rows each to start with.
    nb_start, nb_len, nb_cap = np.arange(n) * 4, np.zeros(n, np.int64), np.full(n, 4, np.int64)
    lo_start, lo_len, lo_cap = np.arange(n) * 4, np.zeros(n, np.int64), np.full(n, 4, np.int64)
    glob = np.empty((n, 4), np.int64)  # at most one entry per region
    seen = np.full(n, -1, np.int64)
    slot = np.empty(n, np.int64)
    merged = np.empty((n, 2), np.int64)
    relabel = np.empty(n, np.int32)
    # Batches of up to 4 pairs scored together (_score_batch): the other
    # regions, their heap positions or merged rows, and the scores.
    batch = np.empty(4, np.int64)
    where = np.empty(4, np.int64)
    scores = np.empty(4, np.int64)
    outcome, rows = _merge_loop(
        flat, w, min_scores, sums, out, inv, summed, parent, alive, ident, version, drift, token,
        nbrs, nb_start, nb_len, nb_cap, local, lo_start, lo_len, lo_cap, glob, seen, slot, merged,
        relabel, batch, where, scores,
    )  # fmt: skip
    return out, outcome, rows


@numba.njit(cache=True, nogil=True, _nrt=False)
def _merge_loop(
    flat, w, min_scores, sums, out, inv, summed, parent, alive, ident, version, drift, token,
    nbrs, nb_start, nb_len, nb_cap, local, lo_start, lo_len, lo_cap, glob, seen, slot, merged,
    relabel, batch, where, scores,
):  # fmt: skip
    """The merge proper, on the arrays of _merge_grid (no allocation, no
    reference counting). Returns (outcome, rows) like _merge_grid."""
    n = flat.shape[0]
    tick = 0
    nb_end = 4 * n
    lo_end = 4 * n
    g_len = 0

    # One pass over the features in raster order: each patch's norm and its
    # products with the upper and left neighbours (still in cache), read once.
    for j in range(n):
        up = j - w if j >= w else -1
        left = j - 1 if j % w != 0 else -1
        sq, dot_up, dot_left = _row_products(flat, j, max(up, 0), max(left, 0))
        if not np.isfinite(sq):  # outside fastmath code, where it could be folded away
            return _NOT_FINITE, 0
        inv[j] = 1.0 / np.sqrt(sq) if sq > 0.0 else 0.0
        for i, dot in ((up, dot_up), (left, dot_left)):
            if i < 0:
                continue
            score = _rounded_score(dot, inv[i], inv[j])
            for a, b in ((i, j), (j, i)):
                nbrs[nb_start[a] + nb_len[a], 0] = b
                nbrs[nb_start[a] + nb_len[a], 1] = 0
                nb_len[a] += 1
                _local_push(local, lo_start, lo_len, a, score, i * n + j, b, 0, 0)
    for r in range(n):
        if lo_len[r] > 0:
            o = lo_start[r]
            _place_up(glob, 0, g_len, 2 * local[o, _KEY], local[o, _CODE], r, 0)
            g_len += 1

    for t in range(min_scores.shape[0]):
        while g_len > 0:
            r = glob[0, _A]
            if not alive[r] or glob[0, _B] != token[r]:
                g_len = _pop(glob, 0, g_len)
                continue
            # The root's children bound every other region's best pair; r's
            # inexact tops are re-scored while they could still beat that.
            rival = _rival(glob, g_len)
            while True:
                _clean_top(local, lo_start, lo_len, r, alive, version)
                if lo_len[r] == 0:
                    break
                o = lo_start[r]
                if (local[o, _B] & _LOW32) == version[r] or (
                    rival > 0 and 2 * (local[o, _KEY] + drift[r]) + 1 < glob[rival, _KEY]
                ):
                    break
                # Re-score the top, and with it up to 3 entries just below it
                # that could also beat the rival (likely needed next), and put
                # each back in place of itself, deepest first.
                count = _pick_batch(local, o, lo_len[r], r, alive, version, drift, glob, rival, where)
                for q in range(count):
                    batch[q] = local[o + where[q], _A]
                _score_batch(flat, sums, summed, inv, r, batch, scores, count)
                for q in range(count - 1, -1, -1):
                    other = batch[q]
                    code = min(ident[r], ident[other]) * n + max(ident[r], ident[other])
                    tags = (version[other] << 32) | version[r]
                    _place_down(local, o, where[q], lo_len[r], scores[q] - drift[r], code, other, tags)
            if lo_len[r] == 0:
                token[r] += 1
                g_len = _pop(glob, 0, g_len)
                continue
            o = lo_start[r]
            exact = (local[o, _B] & _LOW32) == version[r]
            top_key = local[o, _KEY] + drift[r]
            other = local[o, _A]
            _set_row(glob, 0, 2 * top_key + (0 if exact else 1), local[o, _CODE], r, token[r])
            if not exact or (rival > 0 and _before(glob, rival, 0)):
                _sift_down(glob, 0, 0, g_len)
                continue
            if top_key < min_scores[t]:
                break

            # Certified maximum: merge r with its partner. The region with the
            # longer neighbour list keeps its slot, so that its local heap
            # entries stay usable and only the other's pairs are re-scored.
            lo_len[r] = _pop(local, o, lo_len[r])
            keep, gone = (r, other) if nb_len[r] >= nb_len[other] else (other, r)
            tick += 1
            parent[gone] = keep
            alive[gone] = False
            ident[keep] = min(ident[keep], ident[gone])
            drift[keep] += _drift_units(_absorb(flat, sums, summed, inv, keep, gone))
            version[keep] = tick

            count = _union_neighbours(nbrs, nb_start, nb_len, keep, gone, parent, version, tick, seen, slot, merged)
            lo_end, rows = _room(local, lo_end, lo_start, lo_len, lo_cap, keep, count)
            if rows > 0:
                return _LOCAL_FULL, rows
            # Score the pairs that have no valid entry, 4 at a time.
            pending = 0
            for e in range(count + 1):
                if e < count and merged[e, 1] < 0:
                    batch[pending] = merged[e, 0]
                    where[pending] = e
                    pending += 1
                if pending == 4 or (e == count and pending > 0):
                    _score_batch(flat, sums, summed, inv, keep, batch, scores, pending)
                    for q in range(pending):
                        nb = batch[q]
                        code = min(ident[keep], ident[nb]) * n + max(ident[keep], ident[nb])
                        _local_push(local, lo_start, lo_len, keep, scores[q] - drift[keep], code, nb, version[nb], tick)
                        merged[where[q], 1] = version[nb]
                    pending = 0
            if lo_len[keep] > 2 * count + 16:
                _compact(local, lo_start, lo_len, keep, alive, version)
            nb_len[keep] = 0
            nb_end, rows = _room(nbrs, nb_end, nb_start, nb_len, nb_cap, keep, count)
            if rows > 0:
                return _NBRS_FULL, rows
            ko = nb_start[keep]
            for e in range(count):
                nbrs[ko + e, 0] = merged[e, 0]
                nbrs[ko + e, 1] = merged[e, 1]
            nb_len[keep] = count

            # The root was r's entry: replace it by keep's current best bound.
            _clean_top(local, lo_start, lo_len, keep, alive, version)
            token[keep] += 1
            if lo_len[keep] == 0:
                g_len = _pop(glob, 0, g_len)
            else:
                o = lo_start[keep]
                inexact = np.int64((local[o, _B] & _LOW32) != version[keep])
                _replace_top(glob, 0, g_len, 2 * (local[o, _KEY] + drift[keep]) + inexact, local[o, _CODE], keep, token[keep])
        _label_map(parent, out, t, relabel)
    return _DONE, 0
