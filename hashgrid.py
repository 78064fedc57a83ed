"""Multiresolution hash grid encoding (Instant-NGP, Müller et al. 2022) in plain PyTorch.

A point x in [0, 1]^3 is looked up in L grids of growing resolution. On each
level the 8 surrounding grid corners are mapped to rows of a small learnable
table (densely for coarse levels, through a spatial hash for fine ones) and
their feature vectors are blended with trilinear weights. The L blended
vectors are concatenated into the encoding fed to a tiny MLP.

Level sizes, corner placement and the hash follow tiny-cuda-nn, so tables are
laid out the same way. Speed comes from splitting the work in two:

* corner rows and trilinear weights depend only on the points, never on the
  tables, so they are computed without autograd;
* a custom autograd.Function does the only table-dependent part, level by
  level: one gather plus a batched weighted sum forward, one scatter-add
  backward (bincount on the CPU; index_add_ on CUDA, free of host syncs).

The encoding gives NO gradient to its input points (only to the tables), which
is all that NeRF-style training needs. For the backward pass it keeps each
point's corner rows and weights: 64 bytes per point and level (a lookup
without autograd keeps none).
"""

import math

import torch
from torch import nn

# tiny-cuda-nn's "coherent prime hash": one prime per axis, with 1 for x so
# neighbouring x-cells stay neighbours in memory.
_PRIMES = (1, 2654435761, 805459861)


class _GatherInterp(torch.autograd.Function):
    """out_l[n] = sum_k w_l[k, n] * table_l[idx_l[k, n]], level by level; gradient to the tables only.

    Each level's corner rows and weights (64 bytes per point) are made, used and, unless the backward
    needs them, freed before the next level's: a no-grad lookup never holds all L levels' at once
    (at L = 16 that temporary was ~1 KB per point, most of the renderer's peak memory at 512 px).
    """

    @staticmethod
    def forward(ctx, corners, keep, xt, *tables):  # corners(xt, level) -> ((8, N) int32, (8, N)); tables (R_l, F)
        feats, saved = [], []
        for level, table in enumerate(tables):
            idx, w = corners(xt, level)  # (8, N), (8, N)
            # Batched weighted sum over the corners (as fast as torch.bmm on
            # (N, 1, 8) x (N, 8, F) here, without transposing to that layout).
            feats.append((w.unsqueeze(-1) * _gather_rows(table, idx)).sum(0))  # (N, F)
            if keep:  # for the backward, which then needs no recomputation
                saved += [idx, w]
        ctx.save_for_backward(*saved)
        ctx.n_rows = [table.shape[0] for table in tables]
        return torch.cat(feats, dim=-1)  # (N, L * F)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N, L * F)
        saved = ctx.saved_tensors
        n_feat = grad_out.shape[1] // len(ctx.n_rows)
        # d out_l[n, f] / d table_l[idx[k, n], f] = w[k, n]; corners that share a row must be summed.
        scatter = _scatter_cuda if grad_out.is_cuda else _scatter_cpu
        # On the CPU, one transpose up front: a column of (N, L * F) is strided
        # by L * F; multiplying by such columns cost ~25 ms per level at
        # N = 2**18 on one core, about what this single copy costs for all levels.
        grad_rows = grad_out if grad_out.is_cuda else grad_out.t().contiguous()
        grads = []
        for level, n_rows in enumerate(ctx.n_rows):
            idx, w = saved[2 * level], saved[2 * level + 1]  # (8, N), (8, N)
            cols = slice(level * n_feat, (level + 1) * n_feat)
            grads.append(scatter(idx, w, grad_rows[:, cols] if grad_out.is_cuda else grad_rows[cols], n_rows))
        return None, None, None, *grads


def _scatter_cpu(idx, w, grad_rows, n_rows):  # (8, N), (8, N), (F, N) -> (R, F)
    # One bincount per feature over all 8N corners: at N = 2**18 on one core
    # 128 ms for 2 features vs 175 ms for index_add_ per feature (int64 rows),
    # 618 ms for one index_add_ of (8N, 2) rows and 2.1 s with int32 rows.
    return torch.stack([torch.bincount(idx.view(-1), weights=(w * g).view(-1), minlength=n_rows)
                        for g in grad_rows], dim=1)


def _scatter_cuda(idx, w, grad, n_rows):  # (8, N), (8, N), (N, F) -> (R, F)
    # bincount sizes its output from the largest index, a device-to-host sync
    # per call; index_add_ into a table-sized zero tensor has a static size.
    values = (w.unsqueeze(-1) * grad.unsqueeze(0)).view(-1, grad.shape[1])  # (8N, F)
    return grad.new_zeros(n_rows, grad.shape[1]).index_add_(0, idx.view(-1), values)


def _gather_rows(table, idx):  # table (R, F), idx (8, N) -> (8, N, F)
    n_feat = table.shape[1]
    if n_feat == 2 and table.dtype == torch.float32:
        # Read both float32 features of a row as one float64: one 8-byte load
        # per corner instead of a row copy (3.4 ms vs 25 ms for table[idx]
        # at N = 2**18 on one core).
        rows = table.view(torch.float64).view(-1).index_select(0, idx.view(-1))  # (8N,)
        return rows.view(torch.float32).view(*idx.shape, 2)
    return table.index_select(0, idx.view(-1)).view(*idx.shape, n_feat)


class HashGrid(nn.Module):
    """(N, 3) points in [0, 1]^3 -> (N, n_levels * n_features) float32 features."""

    def __init__(self, n_levels=16, n_features=2, log2_table_size=19, base_resolution=16, max_resolution=2048):
        super().__init__()
        # int32 corner rows (faster to gather and scatter than int64) must not
        # overflow, even before the dense levels' modulo.
        assert log2_table_size <= 30, "table rows are indexed with int32"
        self.n_levels, self.n_features = n_levels, n_features
        self.out_dim = n_levels * n_features
        self.table_size = 2**log2_table_size  # T: max rows per level

        growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(n_levels - 1, 1))
        self.scales = [base_resolution * growth**level - 1 for level in range(n_levels)]
        # Round before ceil: float error (2047.0000000000032) must not add a cell.
        self.resolutions = [math.ceil(round(s, 6)) + 1 for s in self.scales]
        # A level is dense (one row per corner, no collisions) if it fits in T.
        # tcnn also rounds res^3 up to a multiple of 8; using res^3 exactly
        # only changes where the one-past-the-edge corners wrap to.
        self.dense = [r**3 <= self.table_size for r in self.resolutions]
        rows = [min(self.table_size, r**3) for r in self.resolutions]

        # One table per level rather than one flat table for all levels.
        # Forward+backward at N = 2**18 on a 2-core EPYC (medians): 474 ms vs
        # 1336 ms on one thread, 590 ms vs 932 ms on two. A level's table
        # (<= 4 MB) stays in cache while its 8N corners are gathered and
        # scattered; the flat one (47 MB) does not.
        self.tables = nn.ParameterList(
            nn.Parameter(torch.empty(r, n_features).uniform_(-1e-4, 1e-4)) for r in rows
        )

    def forward(self, x):  # x (N, 3) in [0, 1]
        # Axis-major (3, N) points make every per-corner op below run along
        # long contiguous rows; an (N, 8) layout broadcasts over inner dims of
        # size 2 and was ~20x slower for those ops.
        xt = x.detach().t().contiguous()  # (3, N)
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in self.tables)
        return _GatherInterp.apply(self._corners, keep, xt, *self.tables)  # (N, L * F)

    def _corners(self, xt, level):
        """Table rows (int32) and trilinear weights of the 8 cell corners around each point.

        xt: (3, N) points. Returns (8, N) rows and (8, N) weights; corner
        k = 4 * dz + 2 * dy + dx, with d* in {0, 1} the offset along each axis.
        """
        pos = xt * self.scales[level] + 0.5  # (3, N); +0.5 as in tcnn
        lo = pos.floor()
        frac = pos - lo  # (3, N)
        lo = lo.long()
        rows = self.tables[level].shape[0]
        # Per-axis factors are Python numbers, applied row by row in place: no
        # small tensor is copied to the device (a host sync on CUDA) per call.
        factor = (1, self.resolutions[level], self.resolutions[level] ** 2) if self.dense[level] else _PRIMES
        low, high = lo, lo + 1  # (3, N) each
        for axis in (1, 2):
            low[axis] *= factor[axis]
            high[axis] *= factor[axis]
        if not self.dense[level]:
            # tcnn hashes in uint32: (x*p0 ^ y*p1 ^ z*p2) mod 2**32, then mod T.
            # The products fit in int64, and since T divides 2**32,
            # ((.) mod 2**32) mod T == XOR of the per-axis (product mod T):
            # masking each axis with T - 1 gives exactly tcnn's index.
            low &= rows - 1
            high &= rows - 1
        part = torch.stack((low, high), dim=1).int()  # (3, 2, N): lower / upper corner per axis
        weight = torch.stack((1 - frac, frac), dim=1)  # (3, 2, N)

        # Broadcast the per-axis parts to the 8 corners, laid out (dz, dy, dx, N).
        px, py, pz = part  # (2, N) each
        if self.dense[level]:
            # The upper corner of the last cell can fall one past the grid;
            # wrap it like tcnn does instead of indexing out of bounds.
            idx = (pz[:, None, None] + py[None, :, None] + px[None, None, :]) % rows
        else:
            idx = pz[:, None, None] ^ py[None, :, None] ^ px[None, None, :]
        wx, wy, wz = weight  # (2, N) each
        w = wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
        return idx.view(8, -1), w.view(8, -1).to(self.tables[level].dtype)  # (8, N), (8, N)
