"""Timing of tet_grid and marching_tets on a sphere of radius 0.6.

Run: python parts/bench_marching_tets.py [device]   (default cpu)
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))            # marching_tets.py sits one level up
from marching_tets import marching_tets, tet_grid  # noqa: E402


def _sync(device):
    """Wait for queued GPU work, so a timing covers the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, repeats):
    """Median wall time of fn() in ms over `repeats` runs after one warm-up, and fn's last result."""
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[1:]), result


def bench_marching_tets(device, resolutions=(64, 128), repeats=3):
    """One row per resolution: grid size, median ms of tet_grid and marching_tets, mesh size."""
    device = torch.device(device)
    rows = []
    for res in resolutions:
        grid_ms, (vertices, tets) = _median_ms(lambda: tet_grid(res, device), device, repeats)
        sdf = vertices.norm(dim=-1) - 0.6
        extract_ms, (mesh_vertices, faces) = _median_ms(lambda: marching_tets(vertices, tets, sdf), device, repeats)
        rows.append(dict(device=str(device), resolution=res, grid_vertices=len(vertices), tets=len(tets),
                         tet_grid_ms=round(grid_ms, 1), marching_tets_ms=round(extract_ms, 1),
                         vertices=len(mesh_vertices), faces=len(faces)))
    return rows


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for row in bench_marching_tets(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        print("  ".join(f"{key}={value}" for key, value in row.items()))
