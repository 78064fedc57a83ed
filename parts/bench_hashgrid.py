"""Forward+backward throughput of HashGrid vs a straightforward implementation.

Run from the repository root:  python parts/bench_hashgrid.py [repeats]
(set OMP_NUM_THREADS to choose the CPU thread count).
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hashgrid import HashGrid  # noqa: E402


def naive_hashgrid(x, tables, resolutions, scales):
    """The obvious version: per level, plain table[idx] gathers, trilinear lerps, autograd backward."""
    out = []
    for table, res, scale in zip(tables, resolutions, scales):
        pos = x * scale + 0.5
        cell = pos.floor().long()  # (N, 3)
        t = pos - pos.floor()  # (N, 3)
        dense = res**3 <= table.shape[0]

        def corner(dx, dy, dz):  # (N, F) features of one of the 8 corners
            cx, cy, cz = cell[:, 0] + dx, cell[:, 1] + dy, cell[:, 2] + dz
            if dense:
                idx = (cx + cy * res + cz * res * res) % table.shape[0]
            else:
                idx = ((cx ^ (cy * 2654435761) ^ (cz * 805459861)) & 0xFFFFFFFF) % table.shape[0]
            return table[idx]

        def lerp(a, b, w):
            return a + (b - a) * w.unsqueeze(-1)

        c00 = lerp(corner(0, 0, 0), corner(1, 0, 0), t[:, 0])
        c10 = lerp(corner(0, 1, 0), corner(1, 1, 0), t[:, 0])
        c01 = lerp(corner(0, 0, 1), corner(1, 0, 1), t[:, 0])
        c11 = lerp(corner(0, 1, 1), corner(1, 1, 1), t[:, 0])
        out.append(lerp(lerp(c00, c10, t[:, 1]), lerp(c01, c11, t[:, 1]), t[:, 2]))
    return torch.cat(out, dim=-1)


def _seconds(step, device):
    """Wall time of one call of step(), waiting for the GPU if there is one."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_hashgrid(device, sizes=(2**16, 2**18), repeats=5):
    """Median forward+backward points/s of HashGrid (default config) and the naive version."""
    device = torch.device(device)
    grid = HashGrid().to(device)
    tables = list(grid.tables)
    rows = []
    for n in sizes:
        x = torch.rand(n, 3, device=device)
        upstream = torch.randn(n, grid.out_dim, device=device)
        fast_out = grid(x)
        naive_out = naive_hashgrid(x, tables, grid.resolutions, grid.scales)
        assert torch.allclose(fast_out, naive_out, atol=1e-6), "implementations disagree"

        def fast():
            grid.zero_grad(set_to_none=True)
            grid(x).backward(upstream)

        def naive():
            grid.zero_grad(set_to_none=True)
            naive_hashgrid(x, tables, grid.resolutions, grid.scales).backward(upstream)

        fast(), naive()  # warm-up
        # Alternate the two so background load on a shared machine hits both alike.
        t_fast, t_naive = [], []
        for _ in range(repeats):
            t_fast.append(_seconds(fast, device))
            t_naive.append(_seconds(naive, device))
        fast_s, naive_s = statistics.median(t_fast), statistics.median(t_naive)
        rows.append(dict(device=str(device), n_points=n, fast_pts_per_s=n / fast_s, naive_pts_per_s=n / naive_s,
                         fast_ms=fast_s * 1e3, naive_ms=naive_s * 1e3, speedup=naive_s / fast_s))
    return rows


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"HashGrid forward+backward, default config, {device}, {torch.get_num_threads()} threads")
    print(f"{'N':>8} {'fast ms':>9} {'naive ms':>9} {'fast Mpts/s':>12} {'naive Mpts/s':>13} {'speedup':>8}")
    for r in bench_hashgrid(device, repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        print(f"{r['n_points']:>8} {r['fast_ms']:>9.1f} {r['naive_ms']:>9.1f} {r['fast_pts_per_s'] / 1e6:>12.2f} "
              f"{r['naive_pts_per_s'] / 1e6:>13.2f} {r['speedup']:>7.2f}x")
