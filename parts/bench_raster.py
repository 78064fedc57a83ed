"""Timing of render_mesh: forward, and forward + backward, on a geodesic sphere at 512x512.

    python -m parts.bench_raster            # CPU, and CUDA when available
"""
import statistics
import time

import torch

from parts.raster import Camera, render_mesh


def geodesic_sphere(frequency, device="cpu"):
    """Icosahedron with each face split into frequency**2 triangles, projected onto the unit sphere:
    20 * frequency**2 faces, counter-clockwise seen from outside."""
    t = (1 + 5 ** 0.5) / 2
    ico_v = torch.tensor([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                          [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], dtype=torch.float64)
    ico_f = torch.tensor([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                          [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                          [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    n = frequency
    i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    keep = i + j <= n
    i, j = i[keep], j[keep]                                           # lattice points of one face
    index = torch.full((n + 2, n + 2), -1, dtype=torch.long)
    index[i, j] = torch.arange(len(i))
    up = i + j < n                                                    # triangles (i,j) (i+1,j) (i,j+1)
    down = i + j < n - 1                                              # triangles (i+1,j) (i+1,j+1) (i,j+1)
    local = torch.cat([torch.stack([index[i, j], index[i + 1, j], index[i, j + 1]], 1)[up],
                       torch.stack([index[i + 1, j], index[i + 1, j + 1], index[i, j + 1]], 1)[down]])
    faces = (local[None] + len(i) * torch.arange(20)[:, None, None]).reshape(-1, 3)
    # Each lattice point is an integer mix of the 12 icosahedron corners; points on shared edges
    # get the same mix from both faces, which merges them exactly.
    mix = torch.zeros(20, len(i), 12, dtype=torch.long)
    for corner, weight in zip(ico_f.T, (n - i - j, i, j)):
        mix.scatter_add_(2, corner[:, None, None].expand(20, len(i), 1), weight[None, :, None].expand(20, -1, 1))
    unique, inverse = torch.unique(mix.reshape(-1, 12), dim=0, return_inverse=True)
    verts = unique.double() @ ico_v
    verts = verts / verts.norm(dim=-1, keepdim=True)
    return verts.float().to(device), inverse[faces].to(device)


def _median_ms(fn, repeats, device):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def bench_raster(device, sizes=(20_000, 200_000), res=512, repeats=3):
    """One row per mesh size: median forward and forward+backward milliseconds at res x res.
    One camera at distance 3 with a 45 degree field of view: the unit sphere covers ~57% of the image."""
    device = torch.device(device)
    rows = []
    for size in sizes:
        verts, faces = geodesic_sphere(max(1, round((size / 20) ** 0.5)), device)
        verts.requires_grad_(True)
        one = torch.ones(1, device=device)
        camera = Camera.orbit(30 * one, 45 * one, 3 * one, 45 * one)

        def forward():
            return render_mesh(verts, faces, camera, res, res)

        def forward_backward():
            out = forward()
            (out["mask"].sum() + out["normal"].sum() + out["depth"].sum()).backward()
            verts.grad = None

        forward_backward()                                            # warm-up
        rows.append(dict(device=str(device), faces=len(faces), res=res, repeats=repeats,
                         forward_ms=round(_median_ms(forward, repeats, device), 1),
                         forward_backward_ms=round(_median_ms(forward_backward, repeats, device), 1),
                         threads=torch.get_num_threads()))
    return rows


if __name__ == "__main__":
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for row in bench_raster(device):
            print(row)
