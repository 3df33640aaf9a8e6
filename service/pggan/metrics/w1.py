"""The 1-D Wasserstein-1 distance of two equal-size samples, per row: by sorting (the definition; on GPUs) or,
on CPUs, bucketed without sorting (~10x faster for the paper's 2^21-point projections, equal up to float rounding).
"""

from __future__ import annotations

import numpy as np
import torch


def wasserstein1(a: torch.Tensor, b: torch.Tensor, shift_a: torch.Tensor | None = None,
                 shift_b: torch.Tensor | None = None, method: str = "auto",
                 work: "_BucketWork | None" = None) -> torch.Tensor:
    """Per row, the W1 distance of two equal-size 1-D samples: mean |sort(a - shift_a) - sort(b - shift_b)|.

    a, b: float [d, M], one sample per row (contiguous rows); shifts: [d] or None. Returns float64 [d] (CPU).

    method "sort" is the definition. method "bucket" (the CPU default for M >= 2^15) gets the same value
    without sorting, from W1 = integral |F_a(t) - F_b(t)| dt: values go into equal-width buckets; in a bucket
    where F_a - F_b cannot change sign the integral is |(F_a - F_b at its left edge) x width + (signed sum of
    its points' distances to its right edge) / M|, from per-bucket counts and sums (two scatter-adds). The
    buckets where the sign may change (where the CDFs cross, ~10% of the points) are split the same way into
    sub-buckets, and what is still ambiguous after that is sorted. Exact up to float rounding: positions in a
    bucket are float32, so it agrees with the sort to ~1e-6..2e-5 relative (tests/test_metrics.py checks it).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"wasserstein1 needs two [d, M] tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    d, m = a.shape
    sa = torch.zeros(d, dtype=torch.float64) if shift_a is None else shift_a.double().cpu()
    sb = torch.zeros(d, dtype=torch.float64) if shift_b is None else shift_b.double().cpu()
    if method == "auto":
        method = "bucket" if _use_buckets(a.device, m) else "sort"
    if method == "sort":
        return _w1_sort(a, b, sa, sb)
    if method != "bucket":
        raise ValueError(f"unknown method {method!r}")
    if work is None or work.m != m:
        work = _BucketWork(m, a.device)
    out = torch.empty(d, dtype=torch.float64)
    for r0 in range(0, d, work.rows):
        r1 = min(d, r0 + work.rows)
        out[r0:r1] = work.w1(a[r0:r1], sa[r0:r1], b[r0:r1], sb[r0:r1])
    return out


def _use_buckets(device: torch.device, m: int) -> bool:
    # Below ~2^15 points torch.sort is as fast and the bucket path's fixed cost dominates.
    return device.type == "cpu" and (1 << 15) <= m < _BucketWork.MAX_POINTS


def _w1_sort(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    # Sorted in float32 as the official code does; shift, difference and mean in float64.
    ya = a.sort(dim=1).values.double() - sa.to(a.device)[:, None]
    yb = b.sort(dim=1).values.double() - sb.to(a.device)[:, None]
    return (ya - yb).abs().mean(dim=1).cpu()


class _BucketWork:
    """Buffers for the bucketed W1 of a group of row pairs, reused (fresh large allocations page-fault slowly).

    Rows are processed a group at a time (about 2^21 values per op) so that the number of torch calls, each a
    synchronisation of the intra-op thread pool, stays small: on a busy machine that cost dominates.
    """

    # When ambiguous buckets hold more than this fraction of a row's points (e.g. a set against itself): sort.
    SORT_FRACTION = 0.75
    # Counts and fraction sums are float32 tables (index_add is fastest there): exact counts below 2^24.
    MAX_POINTS = 1 << 24

    def __init__(self, m: int, device: torch.device, rows: int | None = None):
        if m >= self.MAX_POINTS:
            raise ValueError(f"bucketed W1 supports fewer than {self.MAX_POINTS} points, got {m}")
        self.m = m
        self.rows = rows or max(1, (1 << 21) // m)
        # Few buckets need sorting when a bucket holds far fewer points than the typical gap |F_a - F_b| x M,
        # ~sqrt(M) for two samples of one distribution: M/4 buckets, capped at 2^17 (~16 points of each set
        # per bucket at the paper's 2^21 descriptors, where sqrt(M) ~ 1450; larger tables leave the L2 cache).
        self.k = int(min(1 << 17, max(64, m // 4)))
        g, kk = self.rows, self.k + 1
        self.q = [torch.empty(g, m, dtype=torch.float32, device=device) for _ in range(2)]
        self.f = torch.empty(g, m, dtype=torch.float32, device=device)
        # int32 bucket ids: half the memory traffic of int64 in the scatter and gather passes.
        self.idx = [torch.empty(g, m, dtype=torch.int32, device=device) for _ in range(2)]
        self.ones = torch.ones(g * m, dtype=torch.float32, device=device)
        self.row_base = (torch.arange(g, device=device, dtype=torch.int32) * kk)[:, None]  # [g, 1]: row r's buckets start at r*(k+1)
        self.cnt = [torch.zeros(g * kk, dtype=torch.float32, device=device) for _ in range(2)]
        self.frac = [torch.zeros(g * kk, dtype=torch.float32, device=device) for _ in range(2)]

    def w1(self, a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
        """W1 per row of a - sa[:, None] and b - sb[:, None]: a, b float32 [g, m]; sa, sb float64 [g]."""
        g, m, k, kk = a.shape[0], self.m, self.k, self.k + 1
        a_min, a_max = a.amin(dim=1), a.amax(dim=1)  # (aminmax(dim=) is 25x slower on CPU in torch 2.13)
        b_min, b_max = b.amin(dim=1), b.amax(dim=1)
        lo = torch.minimum(a_min.double() - sa, b_min.double() - sb)  # [g]
        hi = torch.maximum(a_max.double() - sa, b_max.double() - sb)
        flat = ~(hi > lo)  # all values of both samples equal: W1 = 0
        inv = k / torch.where(flat, torch.ones_like(hi), hi - lo)  # buckets per unit
        for s, (x, shift) in enumerate(((a, sa), (b, sb))):
            q, idx, f = self.q[s][:g], self.idx[s][:g], self.f[:g]
            # Position in bucket units: bucket t covers [t, t + 1); bucket k holds the maximum.
            torch.sub(x, (shift + lo).float()[:, None], out=q)
            q.mul_(inv.float()[:, None])
            torch.floor(q, out=f)
            f.clamp_(0, k)  # float32 rounding of (shift + lo) can put the minimum a hair below 0
            q.sub_(f)  # q now holds each point's offset from its bucket's left edge
            idx.copy_(f)
            if g > 1:
                idx.add_(self.row_base[:g])
            self.cnt[s].zero_().index_add_(0, idx.view(-1), self.ones[:g * m])
            self.frac[s].zero_().index_add_(0, idx.view(-1), q.view(-1))
        ca, cb = self.cnt[0][:g * kk].double(), self.cnt[1][:g * kk].double()
        net = ca - cb
        dl = (torch.cumsum(net.view(g, kk), 1) - net.view(g, kk)).view(-1)  # M x (F_a - F_b) at each left edge
        # M x integral of (F_a - F_b) over a bucket, in bucket units: dl x 1 + the sum of (1 - offset) over its
        # a-points - the same over its b-points.
        integral = dl + net - (self.frac[0][:g * kk].double() - self.frac[1][:g * kk].double())
        clear = (dl - cb >= 0) | (dl + ca <= 0)  # F_a - F_b cannot change sign inside the bucket
        total = integral.abs().masked_fill_(~clear, 0).view(g, kk).sum(1)  # [g]
        out = total / inv / m
        if not bool(clear.all()):
            amb = ~clear
            sel = [_flatnonzero(amb.index_select(0, self.idx[s][:g].view(-1))) for s in range(2)]  # point indices
            n_sel = torch.bincount(sel[0] // m, minlength=g) + torch.bincount(sel[1] // m, minlength=g)
            to_sort = n_sel > self.SORT_FRACTION * 2 * m
            if bool(to_sort.any()):  # crossings everywhere (e.g. identical samples): sorting is cheaper
                rows = to_sort.nonzero().view(-1)
                out[rows] = _w1_sort(a[rows], b[rows], sa[rows], sb[rows])
                sel = [i[~to_sort[i // m]] for i in sel]
                amb &= ~to_sort.repeat_interleave(kk)
            if sel[0].numel() + sel[1].numel():
                # Number the ambiguous buckets 0.. in order (rows stay apart: row r's buckets come before r+1's).
                rank = torch.cumsum(amb, 0) - 1
                ids = [self.idx[s][:g].view(-1).index_select(0, sel[s]) for s in range(2)]
                bid = torch.cat([rank.index_select(0, ids[0]), rank.index_select(0, ids[1])])
                off = torch.cat([self.q[s][:g].view(-1).index_select(0, sel[s]) for s in range(2)]).double()
                w = torch.ones(bid.numel(), dtype=torch.float64)
                w[sel[0].numel():] = -1.0
                amb_ids = _flatnonzero(amb)
                out += _ambiguous_area(bid, off, w, dl.index_select(0, amb_ids), amb_ids // kk, g) / inv / m
        return torch.where(flat, torch.zeros_like(out), out)


# Ambiguous buckets with more points than this are split into sub-buckets rather than sorted.
_SORT_POINTS = 1 << 15
_SUB_BUCKETS = 16


def _flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true values of a 1-D CPU bool tensor (numpy's is 2x faster than torch.nonzero here)."""
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _ambiguous_area(bid: torch.Tensor, off: torch.Tensor, w: torch.Tensor, dl: torch.Tensor, row_of: torch.Tensor,
                    g: int, depth: int = 0) -> torch.Tensor:
    """Per row, M x the integral of |F_a - F_b| over a set of buckets, in bucket units: float64 [g].

    Points: bucket number bid (0.., buckets in increasing position), offset in the bucket off (in [0, 1)),
    weight w (+1 for a sample-a point, -1 for b). Per bucket: dl, M x (F_a - F_b) at its left edge, and
    row_of, the row it belongs to. Many points: the same count-and-sum step one level finer
    (_SUB_BUCKETS per bucket), recursing into the sub-buckets that stay ambiguous; few: sort them.
    """
    if bid.numel() <= _SORT_POINTS or depth >= 3:
        return _sorted_area(bid, off, w, dl, row_of, g)
    nb, sb = dl.numel(), _SUB_BUCKETS
    sub = (off * sb).floor_().clamp_(0, sb - 1)
    sid = bid * sb + sub.long()
    soff = off * sb - sub  # offset inside the sub-bucket
    n = nb * sb
    net = torch.zeros(n, dtype=torch.float64).index_add_(0, sid, w)
    tot = torch.zeros(n, dtype=torch.float64).index_add_(0, sid, torch.ones_like(w))
    fnet = torch.zeros(n, dtype=torch.float64).index_add_(0, sid, w * soff)
    ca, cb = (tot + net) / 2, (tot - net) / 2
    net2 = net.view(nb, sb)
    dl_sub = (dl[:, None] + torch.cumsum(net2, 1) - net2).view(-1)  # at each sub-bucket's left edge
    integral = dl_sub + net - fnet
    clear = (dl_sub - cb >= 0) | (dl_sub + ca <= 0)
    row_sub = row_of.repeat_interleave(sb)
    area = torch.zeros(g, dtype=torch.float64).index_add_(0, row_sub, integral.abs().masked_fill_(~clear, 0))
    amb = ~clear
    keep = _flatnonzero(amb.index_select(0, sid))
    if keep.numel():
        rank = torch.cumsum(amb, 0) - 1
        amb_ids = _flatnonzero(amb)
        area += _ambiguous_area(rank.index_select(0, sid.index_select(0, keep)), soff.index_select(0, keep),
                                w.index_select(0, keep), dl_sub.index_select(0, amb_ids),
                                row_sub.index_select(0, amb_ids), g, depth + 1)
    return area / sb  # sub-bucket units -> bucket units


def _sorted_area(bid: torch.Tensor, off: torch.Tensor, w: torch.Tensor, dl: torch.Tensor, row_of: torch.Tensor,
                 g: int) -> torch.Tensor:
    """:func:`_ambiguous_area` by sorting the points: between consecutive points F_a - F_b is constant."""
    pos = bid.double() + off
    order = torch.argsort(pos)  # the bucket number is monotone in the position: buckets stay grouped
    pos, bid, w, off = (t.index_select(0, order) for t in (pos, bid, w, off))
    first = torch.ones_like(bid, dtype=torch.bool)
    first[1:] = bid[1:] != bid[:-1]
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    csum = torch.cumsum(w, 0)
    start = (csum - w)[first]  # running weight before each bucket's first point
    seg = torch.cumsum(first.long(), 0) - 1
    d_left = dl.index_select(0, bid)
    d_after = d_left + csum - start.index_select(0, seg)  # M x (F_a - F_b) just right of each point
    nxt = torch.empty_like(pos)
    nxt[:-1] = pos[1:]
    nxt = torch.where(last, bid.double() + 1, nxt)  # after its last point a bucket runs to its right edge
    area = d_after.abs() * (nxt - pos)
    area += torch.where(first, d_left.abs() * off, torch.zeros_like(area))  # from the left edge to the first point
    return torch.zeros(g, dtype=torch.float64).index_add_(0, row_of.index_select(0, bid), area)
