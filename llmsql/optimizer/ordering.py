"""Field order and row order for prefix-cache reuse (issue 3, rule 3), as a pure data function.

A prompt is rendered as ``instruction + "\\n" + "".join(f"{name}: {value}\\n" ...)`` over the
fields in the order chosen for that row. Consecutive prompts that start alike reuse the
inference engine's prefix KV cache, in whole blocks, within a finite LRU capacity.

:func:`solve` chooses the send order of the rows and, per row, the order of the fields. It
works on integer codes only (numpy and Arrow kernels, no Python loop over rows), so its cost
is near-linear in ``rows x fields``:

1. **Encode.** Each field is dictionary-encoded; an *item* is a ``(field, value)`` pair and
   weighs the length of its rendered line, ``len(f"{name}: {value}\n")``. Identical rows are
   collapsed into one with a multiplicity (their prompts are identical and end up adjacent).
2. **Prefix trees, per row.** Level by level, over all nodes at once, every row picks its next
   field among those it has left; rows that picked the same item form a child node. The
   row's *anchor* item is chosen one of three ways (:data:`Mode`): the largest saving per
   member of its group inside the node, ``weight x (count - 1) / count`` (a long value
   shared by a few rows beats a short one shared by many that would cut across them); the
   column saving most in the whole node; or GGR's hit count ``weight ** 2 x (count - 1)``.
   Then an item constant over the row's anchor group is *hoisted* in front of the anchor
   when that joins other rows without splitting the group: a superset (a genre above its
   movies, a title above its paragraphs) or another group's anchor (a duplicated review
   rejoining its beer). A row stops when nothing it has left is shared in its node; its other
   fields follow one global order (most repeated characters first). So every row follows its
   own data: a row whose evidence is shared more than its claim starts with the evidence.
3. **Send order.** The rows sorted by their rendered item sequence: a depth-first walk of the
   tree, so every group of prompts that shares a prefix is contiguous and its blocks stay hot
   in an LRU cache of any size that holds two prompts.
4. **Guard.** Five depth-first candidates (the three trees, one global field order, the
   fields as given) are scored in whole blocks, partial matches of the next line included,
   which for depth-first orders is what an LRU cache reuses; the best is kept. The last
   candidate is the table's own prompts, sorted: for every block depth it reaches the most
   hits any order of those prompts can reach, so the result is never below the table order.

Invariant: the multiset of ``(row, field -> value)`` is unchanged; only the row order and each
row's field order change. With ``fixed_fields=True`` every row keeps the given field order.

>>> cols = [["x", "y", "x", "y"], ["1", "2", "3", "4"]]
>>> o = solve(cols, ["k", "v"], instruction="Q")
>>> render("Q", ["k", "v"], cols, o)[:2]
['Q\\nk: x\\nv: 1\\n', 'Q\\nk: x\\nv: 3\\n']
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from llmsql.arrays import int64s, ints, large_binary_scalar, large_strings
from llmsql.errors import PlanError

if TYPE_CHECKING:
    from collections.abc import Sequence

# Over the ~500-line guideline (STYLE.md 7.1.6) on purpose: one rule's algorithm, encode ->
# trees -> scoring, whose private helpers share the _Encoded/_Level layouts. The natural split,
# if it grows, is the tree (_tree_perms and helpers) into its own module.

__all__ = ["Column", "Ordering", "render", "repetition_bound", "solve"]

IntArray: TypeAlias = NDArray[np.int64]
Mode: TypeAlias = Literal["share", "node", "square"]
"""How a tree row picks its anchor item: ``share``, the largest saving per member of its
group, ``weight x (count - 1) / count`` (long values shared by few beat short ones shared by
many); ``node``, the column saving most in the whole node, for all its rows (a node is never
split between two independent columns); ``square``, GGR's hit count ``weight ** 2 x
(count - 1)``, taken by each row at once instead of group by group."""
BoolArray: TypeAlias = NDArray[np.bool_]
Column: TypeAlias = "Sequence[str] | pa.Array | pa.ChunkedArray"


@dataclass(frozen=True, slots=True)
class Ordering:
    """The send order of rows and the field order of each prompt.

    Plain tuples, so the value is immutable and hashable (1M rows cost about 10 MB).

    Attributes:
        rows: A permutation of ``range(n)``; ``rows[k]`` is the table row sent k-th.
        field_orders: The distinct field permutations used, each a tuple of field indices
            (positions in the ``columns``/``names`` given to :func:`solve`).
        row_field_order: Per *sent position* ``k`` (not per table row): the index into
            ``field_orders`` of the field order of prompt ``k``, i.e. of row ``rows[k]``.
    """

    rows: tuple[int, ...]
    field_orders: tuple[tuple[int, ...], ...]
    row_field_order: tuple[int, ...]

    @classmethod
    def table_order(cls, n_rows: int, n_fields: int) -> Ordering:
        """The identity: rows as given, fields as given."""
        return cls(tuple(range(n_rows)), (tuple(range(n_fields)),), (0,) * n_rows)

    def fields_of(self, position: int) -> tuple[int, ...]:
        """The field order of the prompt sent at ``position``."""
        return self.field_orders[self.row_field_order[position]]


def render(
    instruction: str,
    names: Sequence[str],
    columns: Sequence[Sequence[str]],
    ordering: Ordering,
) -> list[str]:
    """Render the prompts in send order with the default rendering contract.

    Args:
        instruction: The instruction, written first in every prompt.
        names: Field names, one per column.
        columns: ``columns[j][i]`` is the rendered value of field ``j`` in row ``i``.
        ordering: The result of :func:`solve` (or :meth:`Ordering.table_order`).

    Returns:
        One prompt per row, in the order they are to be sent.

    >>> render("Hi", ["a", "b"], [["1"], ["2"]], Ordering((0,), ((1, 0),), (0,)))
    ['Hi\\nb: 2\\na: 1\\n']
    """
    head = instruction + "\n"
    labels = [f"{name}: " for name in names]
    orders = [[(labels[j], columns[j]) for j in fields] for fields in ordering.field_orders]
    out = []
    for row, k in zip(ordering.rows, ordering.row_field_order, strict=True):
        out.append(head + "".join(f"{label}{col[row]}\n" for label, col in orders[k]))
    return out


# --- encoding ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A table as integer items: ``items[i, j]`` is the global item id of row i, field j."""

    items: IntArray  # (n, m)
    weight: IntArray  # per item: len(f"{name}: {value}\n")
    rank: IntArray  # per item: rank of its rendered line in string order
    prefix: NDArray[np.uint8]  # per item: first UTF-8 bytes of its rendered line, 0-padded
    head: int  # len(instruction + "\n")
    mult: IntArray  # (n,) how many identical table rows each row of ``items`` stands for
    wide: BoolArray  # per item: its stored line prefix has non-ASCII bytes

    @property
    def n_items(self) -> int:
        return int(self.weight.size)


def _dictionary(column: Column) -> tuple[IntArray, pa.Array]:
    """Codes and distinct values of one column (NULL is the empty string)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    arr = column if isinstance(column, pa.Array) else large_strings(column)
    if not pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.large_string())
    if arr.null_count:
        arr = pc.fill_null(arr, large_strings([""])[0])
    enc = arr.dictionary_encode()
    return ints(enc.indices), enc.dictionary


def _line_prefix(label: str, values: pa.Array, width: int) -> NDArray[np.uint8]:
    """The first ``width`` UTF-8 bytes of each value's rendered line, 0-padded.

    The line is the label, the value and a newline. Made by Arrow kernels (append the
    newline and the padding, cut to size): no Python string per value.
    """
    out = np.zeros((len(values), width), dtype=np.uint8)
    head = np.frombuffer(label.encode()[:width], dtype=np.uint8)
    out[:, : head.size] = head
    room = width - head.size
    if room <= 0 or not len(values):
        return out
    binary = pa.large_binary()
    tail = large_binary_scalar(b"\n" + bytes(room))
    padded = pc.binary_join_element_wise(values.cast(binary), tail, large_binary_scalar(b""))
    cut = pc.binary_slice(padded, 0, room)
    bounds = np.frombuffer(cut.buffers()[1], dtype=np.int64)[cut.offset : cut.offset + len(cut) + 1]
    data = np.frombuffer(cut.buffers()[2], dtype=np.uint8)[bounds[0] : bounds[-1]]
    out[:, head.size :] = data.reshape(len(values), room)
    return out


def _encode(columns: Sequence[Column], names: Sequence[str], instruction: str,
            width: int = 0) -> _Encoded:
    """Dictionary-encode every field; items of different fields never share an id.

    ``width`` > 0 also keeps the first ``width`` bytes of every item's rendered line, to
    measure partial matches between lines.
    """
    n = len(columns[0]) if len(columns) else 0
    items = np.empty((n, len(columns)), dtype=np.int64)
    weights, keys, prefixes, offset = [], [], [], 0
    label_rank = np.argsort(np.argsort([f"{name}: " for name in names], kind="stable"))
    for j, (column, name) in enumerate(zip(columns, names, strict=True)):
        codes, values = _dictionary(column)
        lens = ints(pc.utf8_length(values))
        order = ints(pc.array_sort_indices(values))
        within = np.empty(len(values), dtype=np.int64)
        within[order] = np.arange(len(values))
        items[:, j] = codes + offset
        weights.append(lens + len(name) + 3)
        keys.append(label_rank[j] * (n + 1) + within)
        if width:
            prefixes.append(_line_prefix(f"{name}: ", values, width))
        offset += len(values)
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    rank = np.empty_like(key)
    rank[np.argsort(key, kind="stable")] = np.arange(key.size)
    prefix = np.concatenate(prefixes) if prefixes else np.zeros((0, width), np.uint8)
    weight = np.concatenate(weights) if weights else np.zeros(0, np.int64)
    wide = np.asarray((prefix >= 0x80).any(axis=1) if width else np.zeros(weight.size), bool)
    return _Encoded(items, weight, rank, prefix, len(instruction) + 1, np.ones(n, np.int64),
                    wide)


def _dedupe(enc: _Encoded) -> tuple[_Encoded, IntArray]:
    """Collapse identical rows into one with a multiplicity; also return each table row's
    row in the result. Identical rows render identical prompts, which the tree keeps together
    anyway, so the work is done once per distinct row.
    """
    key = np.zeros(enc.items.shape[0], dtype=np.int64)
    for j in range(enc.items.shape[1]):
        key = _factorize(key * enc.n_items + enc.items[:, j])[0]
    distinct = int(key.max()) + 1 if key.size else 0
    first = np.full(distinct, -1, dtype=np.int64)
    first[key[::-1]] = np.arange(key.size - 1, -1, -1)  # earliest table row of each
    return replace(enc, items=enc.items[first], mult=np.bincount(key, minlength=distinct)), key


def _factorize(keys: IntArray) -> tuple[IntArray, int]:
    """Dense codes ``0..k-1`` for int64 keys (hash based, in order of first appearance, as
    ``pandas.factorize`` gives them; Arrow's kernel, so pandas need not be imported).

    >>> _factorize(np.array([7, 3, 7, 9], dtype=np.int64))
    (array([0, 1, 0, 2]), 3)
    """
    enc = pc.dictionary_encode(int64s(keys))
    return ints(enc.indices), len(enc.dictionary)


def _count(keys: IntArray, mult: IntArray) -> tuple[IntArray, IntArray]:
    """A code of each key (small non-negative ints) and how many table rows hold its key
    (``mult``: the rows each entry stands for).
    """
    if keys.size and keys.min() >= 0 and keys.max() < 4 * keys.size:  # small keys: no hashing
        codes = keys
    else:
        codes = _factorize(keys)[0]
    return codes, np.bincount(codes, weights=mult).astype(np.int64)[codes]


def _item_counts(enc: _Encoded) -> IntArray:
    """How many table rows hold each item."""
    m = enc.items.shape[1]
    return np.bincount(enc.items.ravel(), weights=np.repeat(enc.mult, m),
                       minlength=enc.n_items).astype(np.int64)


def _field_priority(enc: _Encoded) -> IntArray:
    """Fields ordered by the characters their repeated values could save, most first."""
    counts = _item_counts(enc)
    extra = enc.weight * np.maximum(counts - 1, 0)
    saved = [int(extra[np.unique(enc.items[:, j])].sum()) for j in range(enc.items.shape[1])]
    return np.array(sorted(range(len(saved)), key=lambda j: (-saved[j], j)), dtype=np.int64)


# --- the prefix tree --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Level:
    """The rows of one tree level: their node, items and unused-and-repeated fields."""

    node: IntArray  # (k,)
    mult: IntArray  # (k,) table rows each row stands for
    items: list[IntArray]  # per column (in priority order): item id, (k,)
    live: list[BoolArray]  # per column: unused and repeated somewhere in the table
    weight: list[IntArray]  # per column: item weight
    n_items: int
    mode: Mode

    def keys(self, j: int) -> IntArray:
        """The ``(node, item)`` key of column ``j``."""
        return self.node * self.n_items + self.items[j]


def _tree_perms(enc: _Encoded, priority: IntArray, mode: Mode = "share") -> IntArray:
    """Per-row field orders from the greedy prefix tree (module docstring, step 2).

    Returns ``perm`` with ``perm[i, d]`` = the field at position d of row i's prompt. Columns
    are visited in ``priority`` order, so ties go to the globally better field. ``mode``
    picks how a row's anchor is chosen (see :data:`Mode`).
    """
    n, m = enc.items.shape
    counts = _item_counts(enc)
    repeats = counts > 1
    cols = [np.ascontiguousarray(enc.items[:, j]) for j in priority]
    perm = np.empty((n, m), dtype=np.int64)
    used = np.zeros(n, dtype=np.int64)  # bit j: column j (priority order) is placed
    node = np.zeros(n, dtype=np.int64)
    act = np.arange(n)
    for depth in range(m):
        live = [((used[act] >> j) & 1 == 0) & repeats[c[act]] for j, c in enumerate(cols)]
        some = np.logical_or.reduce(live) if m else np.zeros(act.size, dtype=bool)
        _finish(perm, act[~some], used[act[~some]], depth, priority)  # nothing left to share
        act, live = act[some], [lv[some] for lv in live]
        if act.size == 0:
            break
        items = [c[act] for c in cols]
        weight = [enc.weight[i] for i in items]
        level = _Level(node[act], enc.mult[act], items, live, weight, enc.n_items, mode)
        best, go = _choose(level, counts if depth == 0 else None)
        _finish(perm, act[~go], used[act[~go]], depth, priority)
        act, best = act[go], best[go]
        perm[act, depth] = priority[best]
        used[act] |= np.left_shift(1, best)
        chosen = enc.items[act, priority[best]]
        node[act], size = _count(node[act] * enc.n_items + chosen, enc.mult[act])
        alone = size == 1  # a node of one table row shares nothing more
        _finish(perm, act[alone], used[act[alone]], depth + 1, priority)
        act = act[~alone]
    return perm


def _finish(perm: IntArray, rows: IntArray, used: IntArray, depth: int,
            priority: IntArray) -> None:
    """Give ``rows`` their unplaced fields, in priority order, from position ``depth`` on."""
    pos = np.full(rows.size, depth, dtype=np.int64)
    for j in range(priority.size):
        free = (used >> j) & 1 == 0
        perm[rows[free], pos[free]] = priority[j]
        pos[free] += 1


def _argmax(values: Sequence[NDArray[Any]]) -> tuple[IntArray, NDArray[np.float64]]:
    """Per row, the first column with the largest value, and that value."""
    best = np.zeros(values[0].size, dtype=np.int64)
    top = values[0].astype(np.float64)
    for j in range(1, len(values)):
        better = values[j] > top
        best[better] = j
        top[better] = values[j][better]
    return best, top


def _choose(lv: _Level, root: IntArray | None = None) -> tuple[IntArray, BoolArray]:
    """Each row's next column, and whether the row still shares anything in its node.

    The anchor is chosen as ``lv.mode`` says (:data:`Mode`; for ``node``, :func:`_agree`).
    :func:`_hoist` then puts a constant item of an anchor group in front of its anchor.
    ``root``: the table's item counts, given while every row is in the root node.
    """
    codes, counts = [], []
    for j, live in enumerate(lv.live):
        code = np.full(live.size, -1, dtype=np.int64)
        count = np.zeros(live.size, dtype=np.int64)
        if root is None:
            code[live], count[live] = _count(lv.keys(j)[live], lv.mult[live])
        else:
            code[live], count[live] = lv.items[j][live], root[lv.items[j][live]]
        codes.append(code)
        counts.append(count)
    share = [w * (c - 1) / np.maximum(c, 1) for w, c in zip(lv.weight, counts, strict=True)]
    if lv.mode == "square":
        best, top = _argmax([w * w * (c - 1.0) for w, c in zip(lv.weight, counts, strict=True)])
    else:
        best, top = _argmax(share)
    go = top > 0
    if go.any():
        if lv.mode == "node":
            best = _agree(lv, counts, share, best, go)
        best = _hoist(lv, codes, counts, best, go)
    return best, go


def _groups(codes: list[IntArray], best: IntArray, go: BoolArray,
            mult: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """Anchor groups: per row its group id (-1 if none), the size (table rows) of every group
    id, and where each column's ids start (``codes[j]``: dense ``(node, item)`` codes).
    """
    base = np.cumsum([0] + [int(c.max()) + 2 for c in codes])  # room for code -1
    group = np.full(go.size, -1, dtype=np.int64)
    for j, code in enumerate(codes):
        mine = go & (best == j)
        group[mine] = base[j] + code[mine]
    size = np.bincount(group[go], weights=mult[go], minlength=base[-1]).astype(np.int64)
    return group, size, base


def _agree(lv: _Level, counts: list[IntArray], share: list[NDArray[np.float64]],
           best: IntArray, go: BoolArray) -> IntArray:
    """One column per node: the one saving most there, ``sum of weight x (count - 1)`` over
    its items; rows whose item of that column is unshared keep their own anchor.

    Per-row anchors can split a node between two columns of similar worth (two independent
    long fields); the per-node tree, the other candidate, does not.
    """
    k = int(lv.node.max()) + 1
    column, top = _argmax([np.bincount(lv.node, weights=sh * lv.mult, minlength=k)
                           for sh in share])
    col = column[lv.node]
    take = (top[lv.node] > 0) & (_pick(counts, col) > 1) & go
    return np.where(take, col, best)


def _pick(arrays: list[IntArray], col: IntArray) -> IntArray:
    """``arrays[col[i]][i]`` for every row i."""
    out = np.zeros(col.size, dtype=np.int64)
    for j, arr in enumerate(arrays):
        mine = col == j
        out[mine] = arr[mine]
    return out


def _hoist(lv: _Level, codes: list[IntArray], counts: list[IntArray], best: IntArray,
           go: BoolArray) -> IntArray:
    """Put an item constant over the row's anchor group in front of the anchor, if any.

    Inside the group nothing changes; outside, the group joins other rows holding the item.
    Preferred: an item whose holders in the node are all whole anchor groups (a superset;
    the one saving most, ``weight x (count - 1)``), else another group's anchor item (the
    largest such group). Only nodes holding more than one group can gain.
    """
    group, size, base = _groups(codes, best, go, lv.mult)
    in_node = np.bincount(lv.node, weights=lv.mult)[lv.node]
    idx = np.nonzero(go & (size[np.maximum(group, 0)] < in_node))[0]
    if idx.size == 0:
        return best
    group = group[idx]
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.diff(group[order], prepend=-1))
    offers = []
    for j, code in enumerate(codes):
        live = lv.live[j][idx]
        if not live.any():
            offers.append(np.zeros(idx.size))
            continue
        code = code[idx]
        const = _constant(lv.items[j][idx], live, order, starts)
        anchored = size[base[j] : base[j + 1]][np.maximum(code, 0)] * (code >= 0)
        offers.append(_offer(lv.weight[j][idx], code, counts[j][idx], const, size[group],
                             anchored, best[idx] != j))
    alt, top = _argmax(offers)
    out = best.copy()
    out[idx] = np.where(top > 0, alt, best[idx])
    return out


def _constant(items: IntArray, live: BoolArray, order: IntArray, starts: IntArray) -> BoolArray:
    """Per row of ``order`` (rows sorted by group, groups beginning at ``starts``): whether
    ``items`` is live and the same for the whole group.
    """
    out = np.zeros(items.size, dtype=bool)
    if order.size == 0:
        return out
    val = np.where(live[order], items[order], -1)
    lo = np.minimum.reduceat(val, starts)
    hi = np.maximum.reduceat(val, starts)
    same = (lo == hi) & (lo >= 0)
    out[order] = np.repeat(same, np.diff(np.append(starts, order.size)))
    return out


def _offer(weight: IntArray, code: IntArray, count: IntArray, const: BoolArray,
           size: IntArray, anchored: IntArray, other: BoolArray) -> NDArray[np.float64]:
    """What hoisting one column is worth per row (0: not hoistable).

    ``code``/``count``: the row's (node, item) code (-1 if not live) and its count;
    ``const``: the item is constant over the row's anchor group of ``size`` rows;
    ``anchored``: how many rows of the node are anchored on this same item.
    """
    if not const.any():
        return np.zeros(code.size)
    not_const = np.bincount(code[(code >= 0) & ~const], minlength=int(code.max()) + 1)
    superset = const & (not_const[np.maximum(code, 0)] == 0) & (count > size)
    joins = const & (anchored > 0) & other
    return np.where(superset, 1e15 + weight * (count - 1.0),
                    np.where(joins, anchored * 1.0, 0.0))


# --- send order and scoring ----------------------------------------------------------------


def _sequence(enc: _Encoded, perm: IntArray) -> IntArray:
    """Item ids of every row (in table order), in that row's prompt order."""
    n, m = perm.shape
    if perm.strides[0] == 0:  # one field order for every row (a broadcast view)
        return enc.items[:, perm[0]]
    flat = np.arange(n, dtype=np.int64)[:, None] * m + perm
    seq: IntArray = enc.items.ravel()[flat]
    return seq


def _dfs_rows(enc: _Encoded, seq: IntArray) -> IntArray:
    """Rows sorted by their rendered item sequence: a depth-first walk of the prefix tree."""
    n, m = seq.shape
    ranks = enc.rank[seq]
    bits = max(int(enc.n_items).bit_length(), 1)
    per_key = max(63 // bits, 1)  # ranks packed into one int64 sort key
    keys = []
    for d in range(0, m, per_key):
        key = np.zeros(n, dtype=np.int64)
        for e in range(d, min(d + per_key, m)):
            key = (key << bits) | ranks[:, e]
        keys.append(key)
    if len(keys) == 1:
        return np.argsort(keys[0], kind="stable").astype(np.int64)
    rows: IntArray = np.lexsort(keys[::-1]).astype(np.int64)
    return rows


def _partial(enc: _Encoded, a: IntArray, b: IntArray) -> IntArray:
    """Common prefix, in characters, of the rendered lines of items ``a`` and ``b``.

    Capped at the stored width (at least one block: enough to tell whether the next block
    boundary is reached). Compares 8 bytes at a time, the first 16 for every pair and the
    rest only where those agree.
    """
    words = enc.prefix.view("<u8")
    common = _common_bytes(words[:, :2], a, b)
    more = np.nonzero(common == 16)[0]
    if more.size and words.shape[1] > 2:
        common[more] = 16 + _common_bytes(words[:, 2:], a[more], b[more])
    out: IntArray = np.minimum(_utf8_chars(enc, a, common),
                               np.minimum(enc.weight[a], enc.weight[b]))
    return out


def _common_bytes(words: NDArray[np.uint64], a: IntArray, b: IntArray) -> IntArray:
    """Leading bytes equal in rows ``a`` and ``b`` of ``words`` (little-endian 8-byte words)."""
    wa, wb = words[a], words[b]
    differ = wa != wb
    first = differ.argmax(axis=1)
    rows = np.arange(first.size)
    x = wa[rows, first] ^ wb[rows, first]
    low = (x & (~x + np.uint64(1))).astype(np.float64)  # lowest differing bit
    byte = np.log2(np.maximum(low, 1.0)).astype(np.int64) // 8
    return np.where(differ.any(axis=1), first * 8 + byte, 8 * words.shape[1])


def _utf8_chars(enc: _Encoded, items: IntArray, nbytes: IntArray) -> IntArray:
    """Characters wholly inside the first ``nbytes`` bytes of each item's stored line."""
    wide = np.nonzero(enc.wide[items])[0]
    if wide.size == 0:
        return nbytes
    out = nbytes.copy()
    data = enc.prefix[items[wide]]
    lead = np.pad((data & 0xC0) != 0x80, ((0, 0), (0, 1)), constant_values=True)
    starts = np.concatenate([np.zeros((wide.size, 1), np.int64), np.cumsum(lead, axis=1)], 1)
    cut = nbytes[wide]
    # a character counts if its successor starts inside the common prefix (or right at it)
    out[wide] = starts[np.arange(wide.size), cut] - ~lead[np.arange(wide.size), cut]
    return out


def _lengths(enc: _Encoded, seq: IntArray) -> IntArray:
    """Prefix length in characters before each item, and of the whole prompt: (n, m + 1)."""
    cum = np.cumsum(enc.weight[seq], axis=1)
    out: IntArray = enc.head + np.concatenate([np.zeros((len(seq), 1), np.int64), cum], axis=1)
    return out


def _reuse_adjacent(enc: _Encoded, seq: IntArray, block: int) -> int:
    """Characters a block cache reuses if each prompt's longest cached prefix is the one it
    shares with the previous prompt (true of depth-first orders, whose groups are contiguous,
    in any LRU cache that holds two prompts). ``seq``: item ids of distinct rows in send
    order; the copies of a row follow it and reuse all its whole blocks.
    """
    n, m = seq.shape
    lengths = _lengths(enc, seq)
    depth = np.cumprod(seq[1:] == seq[:-1], axis=1).sum(axis=1)
    reused = lengths[np.arange(1, n), depth]
    idx = np.nonzero(depth < m)[0]
    reused[idx] += _partial(enc, seq[idx + 1, depth[idx]], seq[idx, depth[idx]])
    return int((np.minimum(reused, lengths[1:, -1]) // block * block).sum()) + _copies(
        enc, lengths, block)


def _copies(enc: _Encoded, lengths: IntArray, block: int) -> int:
    """Whole-block characters reused by the extra copies of duplicated rows."""
    return int(((enc.mult - 1) * (lengths[:, -1] // block * block)).sum())


def _reuse_lru(enc: _Encoded, seq: IntArray, block: int, capacity: int) -> int:
    """Characters an LRU block cache reuses, estimated for any send order and capacity.

    A prompt reuses the longest item prefix an earlier prompt had, if fewer than ``capacity``
    blocks were written since that prompt (writes counted as an unbounded cache makes them),
    plus the common start of the next line. ``seq``: item ids in send order.
    """
    n, m = seq.shape
    lengths = _lengths(enc, seq)
    last = np.full((n, m + 1), -1, dtype=np.int64)  # previous prompt with the same prefix
    last[1:, 0] = np.arange(n - 1)
    key = np.zeros(n, dtype=np.int64)
    for d in range(m):
        key = _factorize(key * enc.n_items + seq[:, d])[0]
        order = np.argsort(key, kind="stable")
        same = key[order[1:]] == key[order[:-1]]
        last[order[1:][same], d + 1] = order[:-1][same]
    full = lengths[:, -1] // block
    ok = last >= 0
    written = np.concatenate([[0], np.cumsum(full - _chain(lengths, ok)[0] // block)])
    ok &= written[:n, None] - written[np.maximum(last, 0) + 1] < capacity
    reused, depth = _chain(lengths, ok)
    idx = np.nonzero((depth >= 0) & (depth < m))[0]
    ref = last[idx, depth[idx]]
    reused[idx] += _partial(enc, seq[idx, depth[idx]], seq[ref, depth[idx]])
    return int((np.minimum(reused // block, full) * block).sum()) + _copies(enc, lengths, block)


def _chain(lengths: IntArray, ok: BoolArray) -> tuple[IntArray, IntArray]:
    """The longest cached prefix (a prefix counts only if every shorter one does): its length
    in characters (0 if none) and its depth in items (-1 if none).
    """
    depth = np.cumprod(ok, axis=1).sum(axis=1) - 1
    reused = np.where(depth >= 0, lengths[np.arange(depth.size), np.maximum(depth, 0)], 0)
    return reused, depth


def _score(enc: _Encoded, seq: IntArray, block: int, capacity: int | None) -> int:
    """Estimated reused characters of a depth-first candidate (``seq``: item ids in send
    order); a cache too small to hold two prompts needs the LRU estimate.
    """
    if capacity is not None:
        longest = int(enc.head + enc.weight[seq].sum(axis=1).max()) // block + 1
        if capacity < 2 * longest:
            return _reuse_lru(enc, seq, block, capacity)
    return _reuse_adjacent(enc, seq, block)


# --- public entry points ------------------------------------------------------------------


def _pack(rows: IntArray, perm: IntArray) -> Ordering:
    """Freeze a send order and per-row field orders into an :class:`Ordering`."""
    n, m = perm.shape
    sent = perm[rows]
    if m <= 12:  # m ** m fits in int64: one integer per field order
        codes = sent @ (m ** np.arange(m, dtype=np.int64))
        index, distinct = _factorize(codes)
        first = np.empty(distinct, dtype=np.int64)
        first[index[::-1]] = np.arange(n - 1, -1, -1)  # earliest position of each order
        firsts = sent[first]
    else:
        firsts, index = np.unique(sent, axis=0, return_inverse=True)
    return Ordering(
        tuple(rows.tolist()),
        tuple(tuple(p) for p in firsts.tolist()),
        tuple(np.asarray(index).reshape(-1).tolist()),
    )


def _check(columns: Sequence[Column], names: Sequence[str]) -> None:
    if len(columns) != len(names):
        msg = (f"got {len(columns)} columns but {len(names)} field names; "
               "pass one name per column")
        raise PlanError(msg)
    lengths = sorted({len(c) for c in columns})
    if len(lengths) > 1:
        msg = f"columns have different lengths {lengths}; every field needs one value per row"
        raise PlanError(msg)


def solve(
    columns: Sequence[Column],
    names: Sequence[str],
    *,
    instruction: str = "",
    fixed_fields: bool = False,
    block: int = 64,
    capacity_blocks: int | None = None,
) -> Ordering:
    """Choose the row send order and per-row field orders that maximise prefix-cache reuse.

    Args:
        columns: ``columns[j][i]`` is the rendered value of field ``j`` in row ``i``: a string
            (NULL already rendered as ``""``; ``None`` is read as ``""``). Arrow string
            arrays are accepted too, without a copy to Python objects.
        names: Field names, one per column; each is part of its rendered line.
        instruction: The instruction written before the fields (only its length matters).
        fixed_fields: Keep the given field order in every prompt (a ``{placeholder}``
            template); only the rows move.
        block: The cache block size in characters: reuse is costed in whole blocks.
        capacity_blocks: The cache capacity in blocks, ``None`` for unbounded. Every
            candidate keeps shared prefixes contiguous, so it only matters when the cache
            cannot hold two prompts.

    Returns:
        An :class:`Ordering`; ``render(instruction, names, columns, result)`` gives the prompts.

    Raises:
        PlanError: ``columns`` and ``names`` differ in number, or the columns in length.
    """
    _check(columns, names)
    enc = _encode(columns, names, instruction, width=-(-block // 8) * 8)
    n, m = enc.items.shape
    if n <= 1 or m == 0:
        return Ordering.table_order(n, m)
    priority = _field_priority(enc)
    distinct, row_of = _dedupe(enc)
    rows, perm = _best_candidate(distinct, priority, fixed_fields, block, capacity_blocks)
    position = np.empty(rows.size, dtype=np.int64)
    position[rows] = np.arange(rows.size)
    sent = np.argsort(position[row_of], kind="stable")  # copies follow in table order
    if perm.strides[0] == 0:
        return _pack(sent, np.broadcast_to(perm[0], (n, m)))
    return _pack(sent, perm[row_of])


def _best_candidate(enc: _Encoded, priority: IntArray, fixed_fields: bool, block: int,
                    capacity: int | None) -> tuple[IntArray, IntArray]:
    """The best depth-first candidate over the distinct rows: ``(send order, field orders)``.

    Candidates: the three trees (:data:`Mode`), one global field order, and the fields as
    given (the only one when ``fixed_fields``); ties keep the earlier one.
    """
    k, m = enc.items.shape
    given = np.broadcast_to(np.arange(m, dtype=np.int64), (k, m))
    perms = [given]
    if not fixed_fields:
        perms = [
            _tree_perms(enc, priority, "share"),
            _tree_perms(enc, priority, "node"),
            _tree_perms(enc, priority, "square"),
            np.broadcast_to(priority, (k, m)),
            given,
        ]
    best, best_score = (np.arange(k), given), -1
    for i, perm in enumerate(perms):
        if any(np.array_equal(perm, other) for other in perms[:i]):
            continue  # the same candidate again
        seq = _sequence(enc, perm)
        rows = _dfs_rows(enc, seq)
        score = _score(replace(enc, mult=enc.mult[rows]), seq[rows], block, capacity)
        if score > best_score:
            best, best_score = (rows, perm), score
    return best


def repetition_bound(
    columns: Sequence[Column], names: Sequence[str], *, instruction: str = ""
) -> float:
    """The share of prompt characters reused if every repeated field value were shared.

    As ``bench/WORKLOADS.md`` defines it: ``(len(instruction + "\\n") x (rows - 1) + sum over
    fields and distinct values of len(f"{f}: {v}\\n") x (count - 1)) / total characters``.

    >>> repetition_bound([["a", "a"]], ["k"])
    0.5
    """
    _check(columns, names)
    enc = _encode(columns, names, instruction)
    n = enc.items.shape[0]
    if n == 0:
        return 0.0
    counts = np.bincount(enc.items.ravel(), minlength=enc.n_items)
    total = enc.head * n + int((enc.weight * counts).sum())
    saved = enc.head * (n - 1) + int((enc.weight * np.maximum(counts - 1, 0)).sum())
    return float(saved / total)
