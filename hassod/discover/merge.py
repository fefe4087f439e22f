"""Stage 1, step 1: hierarchical adaptive clustering of a patch-feature grid.

Every patch of an (h, w) grid starts as its own region; regions touching by a
side (4-connectivity) are neighbours. A region's feature is its summed patch
features, L2-normalised (the same direction as the normalised mean); two
regions' similarity is the dot product of those unit vectors (cosine). The
globally most similar neighbouring pair is merged, again and again, while its
similarity is at least the threshold. Thresholds are taken from high to low
and merging carries over, so each threshold yields a coarser partition of the
same grid (DESIGN.md §4).

Numerical rule, shared with the quadratic test oracle (``tests/oracles.py``)
so that both give identical partitions:

- region sums are kept in the features' dtype (float32 or float64; float32
  sums are off by ~1e-7 relative, far below any meaningful threshold step);
  dot products and norms accumulate in float64, and the cosine of two regions
  is computed as ``(S_a . S_b) / (|S_a| |S_b|)`` (no unit vectors are stored);
- a similarity is rounded to the nearest multiple of ``2**-32`` before it is
  compared, so that float rounding (summation order, SIMD width) cannot decide
  between pairs that are equal in exact arithmetic (duplicated patches, flat
  image areas). Pairs with the same rounded similarity are ties, broken by the
  smallest ``(min id, max id)``; a region's id is the raster index of its
  first patch (a merged region keeps the smaller id);
- a zero feature sum has a zero unit vector: similarity 0 to everything.

Algorithm. The reference implementation rescans every pair after every merge
(quadratic). Recomputing only the merged region's similarities is not enough
either: a large region growing patch by patch would re-score its whole
boundary (hundreds of C-dim dot products) at every merge. Instead each region
keeps candidate pairs in a local max-heap of *upper bounds*: when a region
absorbs another, its unit vector moves by ``delta = |u' - u|`` and, by
Cauchy-Schwarz, every similarity to it moves by at most ``delta``; adding
``delta`` (rounded up) to a per-region drift counter raises the bounds of all
its local entries at once without touching them. A global heap holds each
region's best bound. An entry that reaches the top while inexact is re-scored
(one dot product) and pushed back; the top is merged only when it is exact,
and because inexact bounds are strictly above their true score it is then the
true maximum, tie-break included. Entries whose other region has changed are
dropped lazily (version ticks); neighbour lists remember whether the local
heap still holds a valid entry per neighbour, so after a merge only pairs
without one are scored. The surviving heap is the one with more neighbours
(the tie-break id is tracked separately, so this changes no decision).

Cost: O((n + R) log n) heap operations and O((n + R) C) arithmetic for n
patches and R re-scorings; R is ~3 per merge on photo features and up to ~30
per merge when big regions grow into isotropic noise (benchmarks/bench_merge.py).
"""
from __future__ import annotations

import threading
from typing import Sequence

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
    flat = np.ascontiguousarray(feats.reshape(h * w, c), dtype=dtype)
    sums = _scratch(h * w, c, flat.dtype)
    labels, finite = _merge_grid(flat, h, w, min_scores.astype(np.int64), sums)
    if not finite:
        raise ValueError("features contain NaN or infinite values")
    return labels.reshape(len(levels), h, w)


# Per-thread scratch memory for the (n, C) region sums, kept between calls:
# a fresh 11-22 MB allocation costs several ms of page faults per 60x60x768
# image, as much as the whole merge.
_SCRATCH = threading.local()


def _scratch(n: int, c: int, dtype: np.dtype) -> np.ndarray:
    held = getattr(_SCRATCH, "sums", {})
    buffer = held.get(np.dtype(dtype))
    if buffer is None or buffer.size < n * c:
        buffer = np.empty(n * c, dtype)
        held[np.dtype(dtype)] = buffer
        _SCRATCH.sums = held
    return buffer[: n * c].reshape(n, c)


# --------------------------------------------------------------------------
# Vector arithmetic. A region's vector is its patch feature row (``flat``)
# until it first merges, then its row of ``sums`` (same dtype); ``inv`` holds
# 1 / its norm (0 for a zero vector). Products and sums of products are
# float64; fastmath only reorders them (relative error ~1e-16), far below the
# 2**-32 rounding of scores.


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _squared_norm(row):
    sq = 0.0
    for k in range(row.shape[0]):
        value = np.float64(row[k])
        sq += value * value
    return sq


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _dot(first, second):
    acc = 0.0
    for k in range(first.shape[0]):
        acc += np.float64(first[k]) * np.float64(second[k])
    return acc


@numba.njit(cache=True, nogil=True)
def _score(flat, sums, summed, inv, a, b):
    """round(2**32 * cosine(a, b)) as int64."""
    first = sums[a] if summed[a] else flat[a]
    second = sums[b] if summed[b] else flat[b]
    return np.int64(np.floor(_dot(first, second) * inv[a] * inv[b] * 4294967296.0 + 0.5))


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _add_rows(old, extra, out, inv_old):
    """out = old + extra, rounded to the arrays' dtype (out may be old itself).

    Returns (1 / |out| or 0, |out / |out| - old * inv_old|): the new inverse
    norm and how far the unit vector moved. The sum is formed three times so
    that ``old`` is still intact while the movement is measured, and so that
    the two reductions have no store: ``out`` usually *is* ``old``, and a
    store in a reduction loop makes LLVM fall back (runtime alias check) to a
    scalar loop with a serial float64 sum (630 -> 290 ns per call at C=472).
    """
    sq = 0.0
    for k in range(out.shape[0]):
        value = np.float64(old[k] + extra[k])
        sq += value * value
    inv_new = 1.0 / np.sqrt(sq) if sq > 0.0 else 0.0
    moved = 0.0
    for k in range(out.shape[0]):
        step = np.float64(old[k] + extra[k]) * inv_new - np.float64(old[k]) * inv_old
        moved += step * step
    for k in range(out.shape[0]):
        out[k] = old[k] + extra[k]
    return inv_new, np.sqrt(moved)


@numba.njit(cache=True, nogil=True)
def _absorb(flat, sums, summed, inv, keep, gone):
    """Region ``keep`` takes over ``gone``'s patches: update its sum and
    inverse norm; returns how far its unit vector moved."""
    old = sums[keep] if summed[keep] else flat[keep]
    extra = sums[gone] if summed[gone] else flat[gone]
    inv[keep], moved = _add_rows(old, extra, sums[keep], inv[keep])
    summed[keep] = True
    return moved


@numba.njit(cache=True, nogil=True)
def _drift_units(moved):
    """Integer bound on how far any score can move when a unit vector moves by
    ``moved`` (Cauchy-Schwarz): the margins cover float error in ``moved`` and
    in both scores, rounding of both scores (1), and one unit more so that
    inexact bounds are strictly above the true score."""
    return np.int64(np.ceil((moved * (1.0 + 1e-6) + 1e-12) * 4294967296.0)) + 2


# --------------------------------------------------------------------------
# Binary heaps over rows of a (capacity, 4) int64 array view


@numba.njit(cache=True, nogil=True)
def _before(heap, i, j):
    return heap[i, _KEY] > heap[j, _KEY] or (heap[i, _KEY] == heap[j, _KEY] and heap[i, _CODE] < heap[j, _CODE])


@numba.njit(cache=True, nogil=True)
def _swap(heap, i, j):
    for col in range(4):
        heap[i, col], heap[j, col] = heap[j, col], heap[i, col]


@numba.njit(cache=True, nogil=True)
def _set_row(heap, row, key, code, a, b):
    heap[row, _KEY], heap[row, _CODE], heap[row, _A], heap[row, _B] = key, code, a, b


@numba.njit(cache=True, nogil=True)
def _sift_up(heap, pos):
    while pos > 0:
        up = (pos - 1) >> 1
        if not _before(heap, pos, up):
            break
        _swap(heap, pos, up)
        pos = up


@numba.njit(cache=True, nogil=True)
def _sift_down(heap, pos, size):
    while True:
        best, child = pos, 2 * pos + 1
        if child < size and _before(heap, child, best):
            best = child
        if child + 1 < size and _before(heap, child + 1, best):
            best = child + 1
        if best == pos:
            return
        _swap(heap, pos, best)
        pos = best


@numba.njit(cache=True, nogil=True)
def _pop(heap, size):
    """Remove the top row; returns the new size."""
    size -= 1
    if size > 0:
        _swap(heap, 0, size)
        _sift_down(heap, 0, size)
    return size


@numba.njit(cache=True, nogil=True)
def _rival(heap, size):
    """Index of the better child of the root, or 0 if the root has none."""
    if size < 2:
        return 0
    if size > 2 and _before(heap, 2, 1):
        return 2
    return 1


@numba.njit(cache=True, nogil=True)
def _grown(array, rows):
    out = np.empty((rows, array.shape[1]), array.dtype)
    out[: array.shape[0]] = array
    return out


# --------------------------------------------------------------------------
# Per-region segments (neighbour lists, local heaps) packed into arenas


@numba.njit(cache=True, nogil=True)
def _reserve(arena, end, start, length, cap, region, extra):
    """Make room for ``extra`` more rows in a region's arena segment (moving it
    to the end of the arena if needed); returns (arena, end)."""
    need = length[region] + extra
    if need <= cap[region]:
        return arena, end
    new_cap = max(2 * cap[region], need)
    if end + new_cap > arena.shape[0]:
        arena = _grown(arena, max(2 * arena.shape[0], end + new_cap))
    first = start[region]
    arena[end : end + length[region]] = arena[first : first + length[region]]
    start[region], cap[region] = end, new_cap
    return arena, end + new_cap


@numba.njit(cache=True, nogil=True)
def _local_push(local, start, length, region, key, code, other, other_version, own_version):
    base = start[region]
    _set_row(local, base + length[region], key, code, other, (other_version << 32) | own_version)
    _sift_up(local[base:], length[region])
    length[region] += 1


@numba.njit(cache=True, nogil=True)
def _valid(row, alive, version):
    """Whether a local entry's other region is unchanged since the push."""
    return alive[row[_A]] and version[row[_A]] == row[_B] >> 32


@numba.njit(cache=True, nogil=True)
def _clean_top(local, start, length, region, alive, version):
    """Drop entries at the top of a local heap whose other region has changed."""
    heap = local[start[region] :]
    while length[region] > 0 and not _valid(heap[0], alive, version):
        length[region] = _pop(heap, length[region])


@numba.njit(cache=True, nogil=True)
def _compact(local, start, length, region, alive, version):
    """Keep only the valid entries of a local heap and restore heap order."""
    heap = local[start[region] :]
    kept = 0
    for i in range(length[region]):
        if _valid(heap[i], alive, version):
            if kept != i:
                heap[kept] = heap[i]
            kept += 1
    length[region] = kept
    for pos in range(kept // 2 - 1, -1, -1):
        _sift_down(heap, pos, kept)


# --------------------------------------------------------------------------
# The merge loop


@numba.njit(cache=True, nogil=True)
def _find(parent, r):
    while parent[r] != r:
        parent[r] = parent[parent[r]]  # path halving
        r = parent[r]
    return r


@numba.njit(cache=True, nogil=True)
def _label_map(parent, out_row):
    """Write raster-order consecutive labels of the current partition."""
    n = parent.shape[0]
    relabel = np.full(n, -1, np.int32)
    count = 0
    for i in range(n):
        r = _find(parent, i)
        if relabel[r] < 0:
            relabel[r] = count
            count += 1
        out_row[i] = relabel[r]


@numba.njit(cache=True, nogil=True)
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
def _merge_grid(flat, h, w, min_scores, sums):
    """flat: (h*w, C) patch features in raster order; min_scores: (T,) integer
    thresholds, descending; sums: scratch like ``flat``.
    Returns ((T, h*w) int32 labels, whether all features are finite)."""
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
    tick = 0

    # Neighbour lists: (neighbour, its version when our local heap last got a
    # valid entry for it, or -1). Local heaps: rows as described above.
    nbrs = np.empty((4 * n, 2), np.int64)
    nb_start, nb_len, nb_cap = np.arange(n) * 4, np.zeros(n, np.int64), np.full(n, 4, np.int64)
    nb_end = 4 * n
    local = np.empty((4 * n, 4), np.int64)
    lo_start, lo_len, lo_cap = np.arange(n) * 4, np.zeros(n, np.int64), np.full(n, 4, np.int64)
    lo_end = 4 * n
    glob = np.empty((n, 4), np.int64)  # at most one entry per region
    g_len = 0

    # One pass over the features in raster order: each patch's norm, then its
    # pairs with the left and upper neighbours (still in cache).
    for j in range(n):
        sq = _squared_norm(flat[j])
        if not np.isfinite(sq):  # outside fastmath code, where it could be folded away
            return out, False
        inv[j] = 1.0 / np.sqrt(sq) if sq > 0.0 else 0.0
        for i in (j - w if j >= w else -1, j - 1 if j % w != 0 else -1):
            if i < 0:
                continue
            score = _score(flat, sums, summed, inv, i, j)
            for a, b in ((i, j), (j, i)):
                nbrs[nb_start[a] + nb_len[a], 0] = b
                nbrs[nb_start[a] + nb_len[a], 1] = 0
                nb_len[a] += 1
                _local_push(local, lo_start, lo_len, a, score, i * n + j, b, 0, 0)
    for r in range(n):
        if lo_len[r] > 0:
            top = local[lo_start[r]]
            _set_row(glob, g_len, 2 * top[_KEY], top[_CODE], r, 0)
            _sift_up(glob, g_len)
            g_len += 1

    seen = np.full(n, -1, np.int64)
    slot = np.empty(n, np.int64)
    merged = np.empty((n, 2), np.int64)
    for t in range(min_scores.shape[0]):
        while g_len > 0:
            r = glob[0, _A]
            if not alive[r] or glob[0, _B] != token[r]:
                g_len = _pop(glob, g_len)
                continue
            # The root's children bound every other region's best pair; r's
            # inexact tops are re-scored while they could still beat that.
            rival = _rival(glob, g_len)
            while True:
                _clean_top(local, lo_start, lo_len, r, alive, version)
                if lo_len[r] == 0:
                    break
                top = local[lo_start[r]]
                if (top[_B] & _LOW32) == version[r] or (
                    rival > 0 and 2 * (top[_KEY] + drift[r]) + 1 < glob[rival, _KEY]
                ):
                    break
                other = top[_A]
                lo_len[r] = _pop(local[lo_start[r] :], lo_len[r])
                score = _score(flat, sums, summed, inv, r, other)
                code = min(ident[r], ident[other]) * n + max(ident[r], ident[other])
                _local_push(local, lo_start, lo_len, r, score - drift[r], code, other, version[other], version[r])
            if lo_len[r] == 0:
                token[r] += 1
                g_len = _pop(glob, g_len)
                continue
            top = local[lo_start[r]]
            exact = (top[_B] & _LOW32) == version[r]
            _set_row(glob, 0, 2 * (top[_KEY] + drift[r]) + (0 if exact else 1), top[_CODE], r, token[r])
            if not exact or (rival > 0 and _before(glob, rival, 0)):
                _sift_down(glob, 0, g_len)
                continue
            if top[_KEY] + drift[r] < min_scores[t]:
                break

            # Certified maximum: merge r with its partner. The region with the
            # longer neighbour list keeps its slot, so that its local heap
            # entries stay usable and only the other's pairs are re-scored.
            other = top[_A]
            lo_len[r] = _pop(local[lo_start[r] :], lo_len[r])
            keep, gone = (r, other) if nb_len[r] >= nb_len[other] else (other, r)
            tick += 1
            parent[gone] = keep
            alive[gone] = False
            ident[keep] = min(ident[keep], ident[gone])
            drift[keep] += _drift_units(_absorb(flat, sums, summed, inv, keep, gone))
            version[keep] = tick

            count = _union_neighbours(nbrs, nb_start, nb_len, keep, gone, parent, version, tick, seen, slot, merged)
            local, lo_end = _reserve(local, lo_end, lo_start, lo_len, lo_cap, keep, count)
            for e in range(count):
                nb = merged[e, 0]
                if merged[e, 1] < 0:
                    score = _score(flat, sums, summed, inv, keep, nb)
                    code = min(ident[keep], ident[nb]) * n + max(ident[keep], ident[nb])
                    _local_push(local, lo_start, lo_len, keep, score - drift[keep], code, nb, version[nb], tick)
                    merged[e, 1] = version[nb]
            if lo_len[keep] > 2 * count + 16:
                _compact(local, lo_start, lo_len, keep, alive, version)
            nb_len[keep] = 0
            nbrs, nb_end = _reserve(nbrs, nb_end, nb_start, nb_len, nb_cap, keep, count)
            nbrs[nb_start[keep] : nb_start[keep] + count] = merged[:count]
            nb_len[keep] = count

            # The root was r's entry: replace it by keep's current best bound.
            _clean_top(local, lo_start, lo_len, keep, alive, version)
            token[keep] += 1
            if lo_len[keep] == 0:
                g_len = _pop(glob, g_len)
            else:
                top = local[lo_start[keep]]
                inexact = np.int64((top[_B] & _LOW32) != version[keep])
                _set_row(glob, 0, 2 * (top[_KEY] + drift[keep]) + inexact, top[_CODE], keep, token[keep])
                _sift_down(glob, 0, g_len)
        _label_map(parent, out[t])
    return out, True
