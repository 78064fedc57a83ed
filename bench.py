"""Speed and memory of ProlificDreamer's pieces, measured side by side in one run.

    python bench.py                              # all sections; on a CPU small sizes only (~6-12 min, mem 2-3 more)
    python bench.py --only hashgrid,render       # some sections: hashgrid tets raster render skip refresh stage1 mem
    python bench.py --json rows.json             # also write the header and every row as JSON
    python bench.py --gpu-check                  # the first command on a GPU (section 5; about 8 minutes)

1. building blocks: HashGrid vs a naive per-level grid; marching tets; the mesh rasteriser
2. the volume renderer: a no-grad render, and the training pattern (no-grad render + deferred backward);
   2b. skipping empty space on vs off on a trained known-scene field: lookups per pixel, ms, peak memory, PSNR;
       (refresh) the occupancy grid's refresh in training: lookups per pixel and step at 64 px, PSNR
3. one full stage-1 VSD step with Stable-Diffusion-2.1-shaped random models, ms and peak GPU memory
4. mem: peak GPU memory of one step of every stage, ESTIMATED without a GPU (fake tensors + MemTracker)
5. --gpu-check: short runs of every mode with random SD models, torchrun, a 512-px step, the test suite

Every time is the median over repeats after a warm-up, with torch.cuda.synchronize around each timed
call on a GPU. Peak memory is torch.cuda.max_memory_allocated (and _reserved, closer to what nvidia-smi
shows) after reset_peak_memory_stats; on a CPU it is not measured (section 4 estimates it). On a GPU the
frozen models are fp16, as prolific.py makes them. These are measurements, never asserted by the tests: on
a shared machine absolute times are noisy, so compare the ratios (taken within one run, with the compared
versions interleaved).
"""
import argparse
import contextlib
import gc
import glob
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

import prolific
from hashgrid import HashGrid
from marching_tets import DMTet, marching_tets, tet_grid

from prolific import Camera, render_mesh

PAPER_GB = {64: 17, 128: 17, 256: 18, 512: 27}  # the authors' stage-1 memory at each render size
PAPER_MESH_GB = 17                               # and their mesh fine-tuning at 512 (App. F, both: A100, batch 1)
GOAL_GB = 24                                     # ours: 512 px within a 24 GB card


# -----------------------------------------------------------------------------
# Timing, memory and printing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device):
    """Wall time of one fn(), waiting for queued GPU work before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_ms(fns, device, repeats):
    """{name: median ms} of each fn. The fns take turns on every repeat, so background load from other
    users of a shared machine hits all of them alike. On a GPU one warm-up call each comes first (kernel
    selection, allocator growth); on a CPU, where a run costs seconds, the median absorbs a slow first call."""
    if device.type == "cuda":
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(1000 * seconds(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def free(device):
    """Drop what earlier sections left in PyTorch's GPU cache, so peak reserved counts only this one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device, reserved=False):
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_reserved if reserved else torch.cuda.max_memory_allocated)(device) / 2**30


def print_table(title, rows, columns):
    """columns: (key, header, format) triples; a missing value prints as '-'."""
    cells = [[head for _, head, _ in columns]]
    cells += [["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for line in cells:
        print("  " + "  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def header(device):
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GB, CUDA {torch.version.cuda}"
    else:
        name = platform.processor() or "CPU"
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    import diffusers
    return dict(device=str(device), device_name=name, torch=torch.__version__, diffusers=diffusers.__version__,
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                load_average=round(os.getloadavg()[0], 2), date=time.strftime("%Y-%m-%d %H:%M"))


# -----------------------------------------------------------------------------
# 1. Building blocks: hash grid, marching tets, mesh rasteriser


def naive_hashgrid(x, tables, resolutions, scales):
    """The obvious version: per level, plain table[idx] gathers, trilinear lerps, autograd backward."""
    out = []
    for table, res, scale in zip(tables, resolutions, scales):
        pos = x * scale + 0.5
        cell = pos.floor().long()  # (N, 3)
        t = pos - pos.floor()      # (N, 3)
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


def bench_hashgrid(device, sizes, repeats):
    """Forward+backward points/s of HashGrid (default config: 16 levels x 2 features, table 2^19)
    vs naive_hashgrid on the same tables."""
    grid = HashGrid().to(device)
    tables = list(grid.tables)
    rows = []
    for n in sizes:
        x = torch.rand(n, 3, device=device)
        upstream = torch.randn(n, grid.out_dim, device=device)
        with torch.no_grad():
            same = torch.allclose(grid(x), naive_hashgrid(x, tables, grid.resolutions, grid.scales), atol=1e-6)
        assert same, "HashGrid and the naive grid disagree"

        def fast():
            grid.zero_grad(set_to_none=True)
            grid(x).backward(upstream)

        def naive():
            grid.zero_grad(set_to_none=True)
            naive_hashgrid(x, tables, grid.resolutions, grid.scales).backward(upstream)

        ms = median_ms({"fast": fast, "naive": naive}, device, repeats)
        rows.append(dict(section="hashgrid", device=str(device), points=n, hashgrid_ms=ms["fast"],
                         naive_ms=ms["naive"], hashgrid_mpts_s=n / ms["fast"] / 1e3,
                         naive_mpts_s=n / ms["naive"] / 1e3, speedup=ms["naive"] / ms["fast"]))
    print_table("1a. Hash grid forward+backward (HashGrid default config vs naive table[idx] + lerp)", rows, [
        ("points", "points", "{:,}"), ("hashgrid_ms", "HashGrid ms", "{:.1f}"), ("naive_ms", "naive ms", "{:.1f}"),
        ("hashgrid_mpts_s", "HashGrid Mpts/s", "{:.2f}"), ("naive_mpts_s", "naive Mpts/s", "{:.2f}"),
        ("speedup", "speedup", "{:.2f}x")])
    return rows


def bench_tets(device, resolutions, repeats):
    """tet_grid and marching_tets on a sphere SDF of radius 0.6."""
    rows = []
    for res in resolutions:
        vertices, tets = tet_grid(res, device)
        sdf = vertices.norm(dim=-1) - 0.6
        ms = median_ms({"grid": lambda: tet_grid(res, device),
                        "extract": lambda: marching_tets(vertices, tets, sdf)}, device, repeats)
        _, faces = marching_tets(vertices, tets, sdf)
        rows.append(dict(section="marching_tets", device=str(device), resolution=res, grid_vertices=len(vertices),
                         tets=len(tets), tet_grid_ms=ms["grid"], marching_tets_ms=ms["extract"], faces=len(faces)))
    print_table("1b. Marching tetrahedra (sphere r=0.6 on a Freudenthal grid of [-1,1]^3)", rows, [
        ("resolution", "res", "{}"), ("grid_vertices", "grid vertices", "{:,}"), ("tets", "tets", "{:,}"),
        ("tet_grid_ms", "tet_grid ms", "{:.1f}"), ("marching_tets_ms", "marching_tets ms", "{:.1f}"),
        ("faces", "mesh faces", "{:,}")])
    return rows


def geodesic_sphere(frequency, device):
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
    # Each lattice point is an integer mix of the 12 corners; points on shared edges get the same mix
    # from both faces, which merges them exactly.
    mix = torch.zeros(20, len(i), 12, dtype=torch.long)
    for corner, weight in zip(ico_f.T, (n - i - j, i, j)):
        mix.scatter_add_(2, corner[:, None, None].expand(20, len(i), 1), weight[None, :, None].expand(20, -1, 1))
    unique, inverse = torch.unique(mix.reshape(-1, 12), dim=0, return_inverse=True)
    verts = unique.double() @ ico_v
    verts = verts / verts.norm(dim=-1, keepdim=True)
    return verts.float().to(device), inverse[faces].to(device)


def bench_raster(device, sizes, repeats, res=512):
    """render_mesh of a unit geodesic sphere at res x res, one camera at distance 3 with a 45 degree field
    of view (the sphere covers ~57% of the image): forward, and forward + backward to the vertices."""
    rows = []
    for size in sizes:
        verts, faces = geodesic_sphere(max(1, round((size / 20) ** 0.5)), device)
        verts.requires_grad_(True)
        one = torch.ones(1, device=device)
        camera = Camera.orbit(30 * one, 45 * one, 3 * one, 45 * one)

        def forward():  # with the autograd graph, as in training
            render_mesh(verts, faces, camera, res, res)

        def forward_backward():
            out = render_mesh(verts, faces, camera, res, res)
            (out["mask"].sum() + out["normal"].sum() + out["z"].sum()).backward()
            verts.grad = None

        reset_peak(device)
        ms = median_ms({"fwd": forward, "fwd_bwd": forward_backward}, device, repeats)
        rows.append(dict(section="raster", device=str(device), faces=len(faces), resolution=res,
                         forward_ms=ms["fwd"], forward_backward_ms=ms["fwd_bwd"], peak_gb=peak_gb(device)))
    print_table(f"1c. Mesh rasteriser render_mesh at {res}x{res} (geodesic sphere, ~57% of the pixels)", rows, [
        ("faces", "faces", "{:,}"), ("forward_ms", "forward ms", "{:.1f}"),
        ("forward_backward_ms", "fwd+bwd ms", "{:.1f}"), ("peak_gb", "peak GB", "{:.2f}")])
    return rows


# -----------------------------------------------------------------------------
# 2. Volume renderer: 64 + 32 samples per ray, default NeRFField (hash grid 16 x 2, table 2^19)


def bench_render(device, sizes, repeats):
    """rays/s of prolific.render with no gradient, and of the training pattern: the no-grad render, then
    prolific.backward_through_render re-rendering the same samples chunk by chunk with autograd."""
    cfg = prolific.Config()
    torch.manual_seed(0)
    field = prolific.NeRFField(cfg).to(device)
    one = torch.ones(1, device=device)
    camera = prolific.Camera.orbit(15 * one, 30 * one, 1.25 * one, 55 * one)
    rows = []
    for size in sizes:
        grad_rgb = 1e-3 * torch.randn(1, 3, size, size, device=device)  # stands in for the prior's dL/dx
        grad_opacity = 1e-3 * torch.randn(1, 1, size, size, device=device)  # and the regularisers' dL/d(opacity)

        def forward():
            with torch.no_grad():
                return prolific.render(field, camera, size, size)

        def train():
            first = forward()
            field.zero_grad(set_to_none=True)
            prolific.backward_through_render(field, camera, size, first, grad_rgb, grad_opacity, None, cfg)

        reset_peak(device)
        ms = median_ms({"forward": forward, "train": train}, device, repeats)
        rays = size * size
        rows.append(dict(section="render", device=str(device), resolution=size, rays=rays,
                         forward_ms=ms["forward"], forward_krays_s=rays / ms["forward"],
                         train_ms=ms["train"], train_krays_s=rays / ms["train"],
                         train_over_forward=ms["train"] / ms["forward"], peak_gb=peak_gb(device)))
    print_table("2. Volume renderer, 64+32 samples/ray (forward: no grad; train: no-grad render + "
                "backward_through_render)", rows, [
        ("resolution", "res", "{}"), ("rays", "rays", "{:,}"), ("forward_ms", "forward ms", "{:.0f}"),
        ("forward_krays_s", "forward krays/s", "{:.1f}"), ("train_ms", "train ms", "{:.0f}"),
        ("train_krays_s", "train krays/s", "{:.1f}"), ("train_over_forward", "train/forward", "{:.2f}x"),
        ("peak_gb", "peak GB", "{:.2f}")])
    return rows


# -----------------------------------------------------------------------------
# 2b. Skipping empty space (issue 9): the renderer with and without its occupancy grid, early ray termination
# and one-render path, on a field trained on the known scene of the tests (three spheres)


def skip_config(cfg, on):
    """For training with skipping on: cfg as prolific.py runs it. Off: the grid never refreshed (every cell
    stays occupied), no early termination, never one render instead of two (a budget of ~1 byte)."""
    return cfg if on else replace(cfg, occupancy_every=10**9, min_transmittance=0.0, render_memory_gb=1e-9)


def trained_known_scene_field(cfg, steps):
    """A NeRFField trained with cfg on test_prolific's known-scene prior, as test_known_scene_sds_reconstructs_the_object
    trains one, and its held-out PSNR."""
    import test_prolific
    torch.manual_seed(0)
    (field,) = prolific.train_nerf(test_prolific.KnownScenePrior(), replace(cfg, steps=steps))
    return field, test_prolific.held_out_psnr(field, cfg)


def nerf_step(field, cfg, camera, size, grad_rgb, on):
    """The NeRF side of a stage-1 step with a fixed dL/dx. On: render_for_step and backward_through_render as
    train_nerf calls them. Off: the renderer before issue 9 — no grid, a no-grad render, then the deferred
    pass over every sample."""
    if on:
        first = prolific.render_for_step(field, camera, size, None, cfg)
    else:
        with torch.no_grad():
            first = prolific.render(field, camera, size, size, None, cfg.n_samples, cfg.n_importance)
    field.zero_grad(set_to_none=True)
    prolific.backward_through_render(field, camera, size, first, grad_rgb, torch.zeros_like(first["opacity"]), None,
                                     cfg if on else replace(cfg, min_transmittance=0.0))


def count_lookups(field, fn):
    """(points looked up in the hash grid, of them with autograd: looked up again by the backward)."""
    counts, forward = [0, 0], field.grid.forward

    def counting(x):
        counts[0] += len(x)
        counts[1] += len(x) if torch.is_grad_enabled() else 0
        return forward(x)

    field.grid.forward = counting
    try:
        fn()
    finally:
        del field.grid.forward
    return counts


def rss_bytes(key):
    """This process's VmRSS (now) or VmHWM (peak) in bytes, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024


def peak_rss_child(state, cfg, on, size, grad_rgb):
    """In a fresh process: the NeRF side of one step at size px; returns its peak RSS above the RSS before, GB."""
    field = prolific.NeRFField(cfg)
    field.load_state_dict(state)
    one = torch.ones(1)
    camera = Camera.orbit(20 * one, 37 * one, 1.25 * one, 55 * one)
    before = rss_bytes("VmRSS:")
    nerf_step(field, cfg, camera, size, grad_rgb, on)
    return (rss_bytes("VmHWM:") - before) / 2**30


def bench_skip(device, sizes, repeats, train_steps, memory_size=512, settle=8):
    """Side by side, skipping on vs off, on one trained known-scene field: field lookups per pixel and step
    (forward and backward; the grid's refresh as a run past the grid's warmup does it, the occupied cells and a
    random share, once every `occupancy_every` steps, spread over the steps), NeRF-side ms per step (median),
    renderer peak memory at memory_size, and the held-out PSNR of a field trained with skipping on vs off."""
    # Trained as in the test (small_cfg: 32 + 16 samples, 32 px, 32^3 grid, MLP lr 1e-2, which reaches ~26 dB in
    # 300 noise-free steps), with the opaque term from 40% of the steps as the recipe has it from 10k of 25k.
    # Measured with the paper's 64 + 32 samples and the default 128^3 grid, refreshed from all-occupied
    # `settle` times: the grid a long run holds for this field (a 300-step run's own grid still remembers its
    # early fog, which a 25k-step run has long forgotten: a cell empties ~90 refreshes after it last held
    # density 1).
    train = prolific.Config(resolution=32, random_background=0.0, grid_levels=8, grid_log2_table=14,
                            grid_max_resolution=128, n_samples=32, n_importance=16, occupancy_resolution=32,
                            mlp_lr=1e-2, opaque_start=int(0.4 * train_steps), method="sds")
    base = replace(train, n_samples=64, n_importance=32, occupancy_resolution=prolific.Config.occupancy_resolution)
    t0 = time.perf_counter()
    field, psnr_on = trained_known_scene_field(skip_config(train, True), train_steps)
    _, psnr_off = trained_known_scene_field(skip_config(train, False), train_steps)
    field.occupancy = prolific.OccupancyGrid(field.bound, base.occupancy_resolution, every=base.occupancy_every)
    for _ in range(settle):
        field.occupancy.refresh(field.density)
    field = field.to(device)
    field.occupancy.steps.fill_((field.occupancy.warmup + 1) * base.occupancy_every)  # refreshed as past its warmup
    field.occupancy.count = int(field.occupancy.steps)
    refresh_lookups = count_lookups(field, lambda: field.occupancy.refresh(field.density))[0] / base.occupancy_every
    print(f"\n(2b: trained two known-scene fields, {train_steps} steps each, in {time.perf_counter() - t0:.0f} s; "
          f"{base.occupancy_resolution}^3 grid {field.occupancy.mask.float().mean():.1%} visited, "
          f"{(field.occupancy.rho >= field.occupancy.threshold).float().mean():.1%} occupied; a refresh looks up "
          f"{refresh_lookups * base.occupancy_every / base.occupancy_resolution**3:.1%} of the cells)", flush=True)
    one = torch.ones(1, device=device)
    camera = Camera.orbit(20 * one, 37 * one, 1.25 * one, 55 * one)
    refresh_ms = median_ms({"refresh": lambda: field.occupancy.refresh(field.density)}, device, repeats)["refresh"]
    rows = []
    for size in sizes:
        grad_rgb = 1e-3 * torch.randn(1, 3, size, size, device=device)
        steps = {on: (lambda on=on: nerf_step(field, base, camera, size, grad_rgb, on)) for on in (True, False)}
        ms = median_ms({"on": steps[True], "off": steps[False]}, device, repeats)
        for on in (True, False):
            total, graph = count_lookups(field, steps[on])
            pixels = size * size
            extra = refresh_lookups / pixels if on else 0.0
            rows.append(dict(section="skip", device=str(device), resolution=size, skipping="on" if on else "off",
                             fwd_lookups_px=total / pixels + extra, bwd_lookups_px=graph / pixels,
                             ms_per_step=ms["on" if on else "off"] + (refresh_ms / base.occupancy_every if on else 0),
                             psnr=psnr_on if on else psnr_off))
    if device.type == "cpu":
        import multiprocessing
        grad_rgb = 1e-3 * torch.randn(1, 3, memory_size, memory_size)
        state = {k: v.cpu() for k, v in field.state_dict().items()}
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            for on in (True, False):
                gb = pool.apply(peak_rss_child, (state, base, on, memory_size, grad_rgb))
                rows.append(dict(section="skip", device=str(device), resolution=memory_size,
                                 skipping="on" if on else "off", peak_gb=gb))
    else:
        grad_rgb = 1e-3 * torch.randn(1, 3, memory_size, memory_size, device=device)
        for on in (True, False):
            free(device)
            reset_peak(device)
            nerf_step(field, base, camera, memory_size, grad_rgb, on)
            rows.append(dict(section="skip", device=str(device), resolution=memory_size,
                             skipping="on" if on else "off", peak_gb=peak_gb(device)))
    print_table("2b. Skipping empty space on vs off, field trained on the known scene (8-level grid, 64+32 "
                f"samples, {base.occupancy_resolution}^3 occupancy grid)", rows, [
        ("resolution", "res", "{}"), ("skipping", "skipping", "{}"), ("fwd_lookups_px", "fwd lookups/px", "{:.1f}"),
        ("bwd_lookups_px", "bwd lookups/px", "{:.1f}"), ("ms_per_step", "NeRF ms/step", "{:.0f}"),
        ("peak_gb", "peak GB", "{:.2f}"), ("psnr", "held-out PSNR", "{:.2f}")])
    print("  peak GB: on a CPU the peak RSS of a fresh process over its RSS before the step (no-grad render and "
          "deferred pass);\n  on a GPU torch.cuda.max_memory_allocated. Lookups: points through the hash grid; "
          "bwd: those with autograd.")
    return rows


def lookups_in_training(cfg, steps):
    """Train a known-scene field with cfg for `steps` steps (as trained_known_scene_field) and count the points
    looked up in the hash grid during each step: (all, with autograd, in the occupancy grid's refresh), one
    triple per step, the trained field and its held-out PSNR. Wrapping sample_cameras marks the step boundaries
    (train_nerf calls it once at the start of every step, as timed_train_nerf relies on too)."""
    counts, per_step, refreshing = [0, 0, 0], [], [False]
    forward, refresh, sample_cameras = HashGrid.forward, prolific.OccupancyGrid.refresh, prolific.sample_cameras

    def counting(grid, x):
        counts[0] += len(x)
        counts[1] += len(x) if torch.is_grad_enabled() else 0
        counts[2] += len(x) if refreshing[0] else 0
        return forward(grid, x)

    def counted_refresh(grid, density, **kwargs):
        refreshing[0] = True
        try:
            return refresh(grid, density, **kwargs)
        finally:
            refreshing[0] = False

    def marked_sample_cameras(*args, **kwargs):
        per_step.append(list(counts))
        return sample_cameras(*args, **kwargs)

    HashGrid.forward, prolific.OccupancyGrid.refresh, prolific.sample_cameras = counting, counted_refresh, marked_sample_cameras
    try:
        field, psnr = trained_known_scene_field(cfg, steps)
    finally:
        HashGrid.forward, prolific.OccupancyGrid.refresh, prolific.sample_cameras = forward, refresh, sample_cameras
    per_step.append(list(counts))
    assert len(per_step) == steps + 1, "train_nerf no longer calls sample_cameras once per step"
    return [[b - a for a, b in zip(s, t)] for s, t in zip(per_step, per_step[1:])], field, psnr


def bench_refresh(size=64, steps=200, last=50, seeds=(0, 1, 2)):
    """The occupancy grid's refresh in training (issue: the grid's refresh was a third of a small step's field
    work): points looked up in the hash grid per pixel and step over the last `last` of `steps` training steps
    at `size` px, with the default 128^3 grid refreshed every 16 steps, on the known scene trained as the tests
    train it (small_cfg: 8-level grid, 32 + 16 samples, MLP lr 1e-2; the opaque term from 40% of the steps as
    in bench_skip), and the held-out PSNR of the trained field; one row per cfg.seed (the field's initialisation
    and every draw of the run)."""
    cfg = prolific.Config(resolution=size, random_background=0.0, grid_levels=8, grid_log2_table=14,
                          grid_max_resolution=128, n_samples=32, n_importance=16, mlp_lr=1e-2,
                          opaque_start=int(0.4 * steps), method="sds")
    rows = []
    for seed in seeds:
        t0 = time.perf_counter()
        per_step, field, psnr = lookups_in_training(replace(cfg, seed=seed), steps)
        fwd, bwd, refresh = (sum(s[k] for s in per_step[-last:]) / (last * size * size) for k in range(3))
        occupied = (field.occupancy.rho >= field.occupancy.threshold).float().mean().item()
        rows.append(dict(section="refresh", resolution=size, seed=seed, lookups_px=fwd + bwd, bwd_lookups_px=bwd,
                         refresh_lookups_px=refresh, occupied=occupied, visited=field.occupancy.mask.float().mean().item(),
                         psnr=psnr, seconds=time.perf_counter() - t0))
    print_table(f"2b. The occupancy grid's refresh in training: lookups per pixel and step over the last {last} of "
                f"{steps} steps at {size} px ({cfg.occupancy_resolution}^3 grid, every {cfg.occupancy_every} steps)",
                rows, [("seed", "seed", "{}"), ("lookups_px", "lookups/px/step", "{:.1f}"),
                       ("bwd_lookups_px", "of them bwd", "{:.1f}"), ("refresh_lookups_px", "of them refresh", "{:.1f}"),
                       ("occupied", "occupied", "{:.1%}"), ("visited", "visited", "{:.1%}"),
                       ("psnr", "held-out PSNR", "{:.2f}"), ("seconds", "s", "{:.0f}")])
    print("  lookups: points through the hash grid, forward (the render's and the refresh's) plus backward (those\n"
          "  with autograd, looked up again), as in the table above; occupied / visited: the grid's cells at the end")
    return rows


# -----------------------------------------------------------------------------
# 3. One stage-1 step with Stable-Diffusion-2.1-shaped random models


def timed_train_nerf(prior, cfg, schedule, device):
    """Run prolific.train_nerf itself for len(schedule) steps, step k rendering at schedule[k], and
    return each finished step's seconds and peak GB, plus the error that stopped it early (or None).

    train_nerf calls sample_cameras once at the start of every step, so wrapping it marks the step
    boundaries: a step's time is exactly the loop body (no-grad render -> VAE encode ->
    distillation_grad -> surrogate backward -> backward_through_render -> field optimiser step ->
    eps_phi step), without the building of eps_phi and the fields that precedes the loop.
    Wrapping render_size lets one call (and one eps_phi) cover every resolution."""
    assert hasattr(prolific, "sample_cameras") and hasattr(prolific, "render_size"), "train_nerf's hooks moved"
    sample_cameras, render_size = prolific.sample_cameras, prolific.render_size
    marks, peaks = [], []

    def step_boundary():
        sync(device)
        marks.append(time.perf_counter())
        if len(marks) > 1:
            peaks.append((peak_gb(device), peak_gb(device, reserved=True)))
        reset_peak(device)

    def marked_sample_cameras(*args, **kwargs):
        step_boundary()
        return sample_cameras(*args, **kwargs)

    prolific.sample_cameras = marked_sample_cameras
    prolific.render_size = lambda step, cfg: schedule[step]
    error = None
    try:
        prolific.train_nerf(prior, replace(cfg, steps=len(schedule), warmup_steps=0))
        step_boundary()
        assert len(marks) == len(schedule) + 1, "train_nerf no longer calls sample_cameras once per step"
    except (torch.cuda.OutOfMemoryError, prolific.TrainingStopped) as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    finally:
        prolific.sample_cameras, prolific.render_size = sample_cameras, render_size
    return [b - a for a, b in zip(marks, marks[1:])], peaks, error


def bench_stage1(device, resolutions, steps, warmup, lora_models):
    """ms per stage-1 VSD step and peak GPU memory at each render resolution. Models: SD-2.1-base-shaped
    with random weights (--model random-sd21); eps_phi is LoRA on a separate random SD-shaped
    v-prediction UNet (lora_model "default", the authors' choice: two UNets) or on the prior's own UNet
    ("same"). Each resolution runs `warmup` steps, whose time is shown as "first ms" but whose peak memory
    counts, then `steps` timed ones; ms/step is their median."""
    base = prolific.Config(prompt="a hamburger", model="random-sd21", method="vsd")
    free(device)
    t0 = time.perf_counter()
    prior = prolific.StableDiffusionPrior(base, device, prolific.guidance_scale(base, "vsd"))
    print(f"\n(stage 1: built the random SD-2.1-shaped prior in {time.perf_counter() - t0:.0f} s)", flush=True)
    n = warmup + steps
    schedule = [r for r in resolutions for _ in range(n)]
    rows = []
    for lora in sorted(lora_models, key=lambda m: m == "same"):  # "same" last: it keeps its LoRA on the prior
        cfg = base if lora == "default" else replace(base, lora_model=lora)
        times, peaks, error = timed_train_nerf(prior, cfg, schedule, device)
        for k, res in enumerate(resolutions):
            block, mem = times[k * n:(k + 1) * n], peaks[k * n:(k + 1) * n]
            timed = block[warmup:]
            alloc = max((a for a, _ in mem), default=None) if device.type == "cuda" else None
            reserved = max((r for _, r in mem), default=None) if device.type == "cuda" else None
            rows.append(dict(section="stage1", device=str(device), lora_model=lora, resolution=res,
                             steps=len(timed), ms_per_step=1000 * statistics.median(timed) if timed else None,
                             first_ms=1000 * block[0] if block else None, peak_alloc_gb=alloc,
                             peak_reserved_gb=reserved, paper_gb=PAPER_GB.get(res),
                             fits_24gb=None if reserved is None else ("yes" if reserved <= GOAL_GB else "no"),
                             error=error if len(block) < n else None))
        free(device)
    where = "GPU, fp16 frozen models" if device.type == "cuda" else "CPU, fp32 (GPU rows come from a CUDA run)"
    print_table(f"3. One stage-1 VSD step, SD-2.1-shaped random models, {where}", rows, [
        ("lora_model", "lora_model", "{}"), ("resolution", "res", "{}"), ("steps", "steps", "{}"),
        ("ms_per_step", "ms/step (median)", "{:.0f}"), ("first_ms", "first ms", "{:.0f}"),
        ("peak_alloc_gb", "peak alloc GB", "{:.1f}"), ("peak_reserved_gb", "peak reserved GB", "{:.1f}"),
        ("paper_gb", "paper GB", "{}"), ("fits_24gb", f"<= {GOAL_GB} GB", "{}"), ("error", "error", "{}")])
    print(f"  paper (authors' code): {'/'.join(str(v) for v in PAPER_GB.values())} GB at "
          f"{'/'.join(str(k) for k in PAPER_GB)} px; our goal: 512 px within {GOAL_GB} GB (peak reserved).\n"
          f"  default: eps_phi on a second UNet; same: LoRA on the prior's UNet. Every render is resized to "
          f"512 for the VAE,\n  so the VAE and UNet cost the same at every resolution: only the NeRF "
          f"render grows with res.")
    return rows


# -----------------------------------------------------------------------------
# 4. Peak GPU memory of one step of every stage, ESTIMATED without a GPU
#
# FakeTensorMode runs real code on tensors that have a shape, a dtype and a device but no data, and MemTracker
# (torch.distributed._tools.mem_tracker) adds up, op by op, the bytes of every storage alive. So the estimates
# below run prolific's own functions (encode, distillation_grad, surrogate_loss, eps_phi_step, decode) on
# SD-2.1-shaped fp16 models that never hold a byte, in a few seconds each. What cannot run that way:
#   - Fake *CUDA* tensors, in a CPU-only build of torch (2.13): indexing one (t[:, None], in diffusers' timestep
#     embedding) asks for a CUDA device guard and raises, and a backward aborts the process. So every piece runs
#     on fake CPU fp16 tensors. There SDPA takes its flash kernel (_scaled_dot_product_flash_attention_for_cpu),
#     which keeps the output and the log-sum-exp for backward, as CUDA's flash and memory-efficient kernels do;
#     the math path keeps every layer's (L, L) attention matrix instead (math_attention_gb measures it).
#   - LoRAScore runs under CUDA autocast, which computes group_norm and layer_norm in fp32 (torch.amp's "CUDA ops
#     that can autocast to float32"); CPU autocast keeps them in fp16, so Fp32Norms adds that back.
#   - The renderers' data-dependent ops (nonzero, sort, unique) need real data. The NeRF renderer's figure is its
#     own plan: prolific.SAMPLE_BYTES per sample (peak RSS measured on the CPU) in chunks from rays_per_chunk under
#     memory_budget, every ray's 96 samples counted. The mesh stages' figure is measured: the peak RSS of their
#     rasteriser, DMTet and texture field on the CPU, in a fresh process (mesh_side_child).
# Not counted: the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack (reserved - allocated),
# so the estimates compare with torch.cuda.max_memory_allocated (section 3); nvidia-smi shows more.

GB, FP16, CPU, META = 2**30, torch.float16, torch.device("cpu"), torch.device("meta")


class StepTracker(MemTracker):
    """MemTracker with two changes for frozen diffusion models (torch 2.13): it hooks every parameter of a module
    it meets for its gradient, which raises on a frozen one, so only modules whose parameters all train are hooked
    (the LoRA layers, the camera MLP); and it keeps only the global peak (its per-module snapshots at every op
    made a step over 10x slower). It also notes which attention ops ran."""

    def __init__(self):
        super().__init__()
        self.attention = set()

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        trains = all(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and trains)

    def _update_peak_stats(self, peak_state):
        for device, snap in self._curr_mem_snap.items():
            if snap["Total"] > self._peak_mem.get(device, 0):
                self._peak_mem[device], self._peak_mem_snap[device] = snap["Total"], dict(snap)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]  # e.g. _scaled_dot_product_flash_attention_for_cpu; math: _safe_softmax
        if "scaled_dot_product" in name or name == "_safe_softmax":
            self.attention.add(name)
        return super().__torch_dispatch__(func, types, args, kwargs)


def tracked(fn, *held):
    """Run fn() under a StepTracker that counts `held` (models, optimiser) as already there. Returns fn's result,
    the peak bytes of the rest (activations and temporaries; parameters, buffers, parameter gradients and optimiser
    states are left out, they are counted once for the whole step), those bytes still alive at the end, and the
    attention ops that ran."""
    tracker = StepTracker()
    tracker.track_external(*held)
    with tracker:
        out = fn()

    def transient(snapshot):  # {device: {kind: bytes}}, one device here: the fake CPU
        s = {getattr(k, "value", k): v for k, v in next(iter(snapshot.values()), {"Total": 0}).items()}
        return s["Total"] - sum(s.get(k, 0) for k in ("Parameter", "Buffer", "Gradient", "Optstate"))
    peak, now = (transient(tracker.get_tracker_snapshot(kind)) for kind in ("peak", "current"))
    return out, peak, now, tracker.attention


def attention_name(ops):
    """The SDPA path of a set of dispatched ops, in words."""
    names = {"_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)", "_scaled_dot_product_flash_attention":
             "flash", "_scaled_dot_product_efficient_attention": "mem-efficient", "_safe_softmax": "math"}
    return "+".join(sorted({names.get(op, op) for op in ops if "backward" not in op})) or "-"


class Fp32Norms(torch.overrides.TorchFunctionMode):
    """group_norm and layer_norm of fp16 inputs computed in fp32, as CUDA autocast does and CPU autocast does not."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        norm = func in (F.group_norm, F.layer_norm)
        up = lambda a: a.float() if norm and torch.is_tensor(a) and a.dtype == FP16 else a
        return func(*[up(a) for a in args], **{k: up(v) for k, v in (kwargs or {}).items()})


def cuda_autocast_on_cpu(eps_phi):
    """LoRAScore.forward casts under torch.autocast("cuda") on a GPU and not at all on a CPU: wrap it so that its
    fake CPU run casts as CUDA would (fp16 matmuls, convolutions and attention; fp32 norms)."""
    forward = eps_phi.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=FP16), Fp32Norms():
            return forward(*args, **kwargs)
    eps_phi.forward = autocast_forward


def fake_on(mode, device, *modules):
    """Re-wrap every meta parameter and buffer of the modules as a fake tensor on `device`, in place. (The models
    are built on the meta device: Module.to and .half cannot convert fake parameters, swap_tensors refuses them.)"""
    fake = lambda t: mode.fake_tensor_converter.from_meta_and_device(mode, t, device)
    for module in modules:
        for m in module.modules():
            for k, p in m._parameters.items():
                if p is not None and p.is_meta:
                    m._parameters[k] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
            for k, b in m._buffers.items():
                if b is not None and b.is_meta:
                    m._buffers[k] = fake(b)
    return fake


def fake_sd(lora_model, mode):
    """prolific's StableDiffusionPrior and eps_phi (LoRAScore) as they are on CUDA, SD-2.1-shaped and fake: frozen
    UNet and VAE in fp16, LoRA and camera MLP in fp32, the text embeddings in fp16 (the text encoder is freed in
    __init__). eps_phi sits on a second v-prediction UNet, or with lora_model "same" on the prior's."""
    import diffusers
    cfg = prolific.Config(prompt="a hamburger", model="random-sd21", method="vsd", lora_model=lora_model)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # not the warning on .to(fp16) that a GPU run prints too
    with META:
        prior = prolific.StableDiffusionPrior(cfg, META, prolific.guidance_scale(cfg, "vsd"))
        prior.unet.half()
        prior.vae.half()
        prior.dtype = FP16  # as __init__ sets it on CUDA: lora_unet makes the second UNet fp16 from it
        eps_phi = prior.eps_phi(cfg)
    diffusers.utils.logging.set_verbosity(verbosity)
    fake = fake_on(mode, CPU, prior.unet, prior.vae, eps_phi)
    prior.alphas_cumprod = fake(prior.alphas_cumprod)
    prior.emb_plain, prior.emb_views, prior.emb_negative = (
        fake(e.half()) for e in (prior.emb_plain, prior.emb_views, prior.emb_negative))
    prior.device = CPU
    cuda_autocast_on_cpu(eps_phi)
    with mode:
        opt_phi = eps_phi.optimizer()
    return cfg, prior, eps_phi, opt_phi


def nbytes(*objects):
    """Bytes of tensors and of modules' parameters and buffers, each tensor once."""
    seen = {}
    for obj in objects:
        tensors = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, nn.Module) else [obj]
        seen.update((id(t), t.numel() * t.element_size()) for t in tensors)
    return sum(seen.values())


def trained_bytes(params, copies=3):
    """What training adds to parameters and keeps from step to step: the gradient and Adam(W)'s two moments, 3x
    their bytes (copies=2: the moments alone; 1: a gradient left from an earlier stage)."""
    return copies * sum(p.numel() * p.element_size() for p in params)


def sd_step(prior, eps_phi, opt_phi, mode, x0_of, camera=None, batch=1):
    """The prior's side of one training step, in phases: "prior" from x0 = g(theta) (x0_of() encodes the render,
    or picks the 2D particles) through distillation_grad to surrogate_loss's backward: the VAE's graph, the UNet
    CFG pass, eps_phi's no-grad pass, the VAE's backward; "after" what stays of it (x0, g, dL/dx); "eps_phi" the
    Eq. (8) step: LoRA forward + backward + AdamW. Bytes above models, gradients and optimiser states."""
    held = [prior.unet, prior.vae] + ([eps_phi, opt_phi] if eps_phi is not None else [])
    with mode:
        def prior_phase():
            x0 = x0_of()
            t = prolific.sample_t(batch, prolific.Config.t_min, prolific.Config.t_max, CPU)
            g = prolific.distillation_grad(prior, x0, t, torch.randn_like(x0), camera, eps_phi)
            prolific.surrogate_loss(x0, g).backward()
            return x0
        x0, peak, after, attention = tracked(prior_phase, *held)
        phases = dict(prior=peak, after=after)
        if eps_phi is not None:
            _, phases["eps_phi"], _, more = tracked(
                lambda: prolific.eps_phi_step(eps_phi, opt_phi, x0, camera, 0), *held)
            attention |= more
    return phases, attention


def math_attention_gb(d):
    """GB above the models of one eps_phi step (batch 1) with SDPA held to the math path, which keeps each attention
    layer's softmax for backward: what a GPU without flash or memory-efficient kernels would hold. d: diffusion_side."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    prior, eps_phi, opt_phi = d["prior"], d["eps_phi"], d["opt_phi"]
    with d["mode"], sdpa_kernel(SDPBackend.MATH):
        x0, camera = torch.randn(1, 4, 64, 64), prolific.sample_cameras(1, prolific.Config(), CPU)
        _, peak, _, _ = tracked(lambda: prolific.eps_phi_step(eps_phi, opt_phi, x0, camera, 0),
                                prior.unet, prior.vae, eps_phi, opt_phi)
    return peak / GB


def nerf_render_plan(cfg, size, budget):
    """Bytes the stage-1 renderer holds in each phase of a step, as prolific plans them: SAMPLE_BYTES per sample,
    every ray's n_samples + n_importance samples counted (an upper bound where empty-space skipping and early
    termination drop samples), in chunks from rays_per_chunk. If the whole image's graph fits the budget,
    render_for_step keeps it from the render to backward_through_render; otherwise a no-grad render, then
    chunk-by-chunk re-renders with autograd (deferred back-propagation). `rendered` keeps its weights, depths and
    deltas (N, S) fp32 all step, and the last step's until the new render returns."""
    s, rays = cfg.n_samples + cfg.n_importance, size * size
    kept = rays * s * 12
    graph = rays * s * prolific.SAMPLE_BYTES[True]
    if graph <= budget:
        return dict(path="graph", render=graph + kept, prior=graph, backward=graph, eps_phi=kept)
    chunk = lambda grad: min(rays, prolific.rays_per_chunk(budget, s, grad)) * s * prolific.SAMPLE_BYTES[grad]
    return dict(path="deferred", render=chunk(False) + 2 * kept, prior=kept,
                backward=chunk(True) + kept + rays * s, eps_phi=kept)  # + the (N, S) bool mask of kept samples


def reset_peak_rss():
    """Restart VmHWM from the current RSS (Linux: clear_refs 5); where not allowed the peak stays an upper bound."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def mesh_side_child(stage, size=512):
    """In a fresh process: the mesh side of one stage-2 (geometry) or stage-3 (texture) step at size px, on a DMTet
    of Config().tet_resolution holding a sphere of radius 0.5 seen from 1.25 (~115k faces, ~55% of the pixels), with
    a fixed dL/d(image) in place of the VAE's. Returns GB over the RSS at the step's start: "held" once the image is
    made (its graph, alive while the VAE and UNets run), "peak" the step's peak, "after" what is left after backward
    (the gradients); and the bytes of the DMTet, the NeRF field the run keeps, the texture field, and of the
    parameters that train."""
    cfg = prolific.Config()
    torch.manual_seed(0)
    dmtet = DMTet.from_sdf(cfg.tet_resolution, lambda p: p.norm(dim=-1) - 0.5)
    nerf = prolific.NeRFField(cfg)
    tex = prolific.TextureField(nerf)
    one = torch.ones(1)
    camera = Camera.orbit(20 * one, 37 * one, 1.25 * one, 55 * one)
    if stage == 3:
        with torch.no_grad():
            vertices, faces = dmtet()
    reset_peak_rss()
    before = rss_bytes("VmRSS:")
    if stage == 2:  # train_geometry: the surface, its normal map and regularisers, all with autograd
        vertices, faces = dmtet()
        raster = render_mesh(vertices, faces, camera, size, size, smooth_normals=True)
        image = prolific.normal_image(raster, torch.ones(1, 3))
        consistency, laplacian = prolific.mesh_regularisers(vertices, faces)
        extra = cfg.lambda_normal_consistency * consistency + cfg.lambda_laplacian * laplacian
    else:  # train_texture: the frozen mesh rasterised without gradient, the texture field with it
        with torch.no_grad():
            raster = render_mesh(vertices, faces, camera, size, size)
        image = prolific.texture_image(tex, raster, torch.ones(1, 3))
        extra = 0.0
    held = rss_bytes("VmRSS:") - before
    ((image * 1e-3 * torch.randn_like(image)).sum() + extra).backward()
    return dict(held=held / GB, peak=(rss_bytes("VmHWM:") - before) / GB, after=(rss_bytes("VmRSS:") - before) / GB,
                dmtet=nbytes(dmtet), nerf=nbytes(nerf), tex=nbytes(tex),
                trains=trained_bytes((dmtet if stage == 2 else tex).parameters(), copies=1))


def measure_mesh_sides():
    """mesh_side_child for stages 2 and 3, each in a fresh process whose malloc gives every block of 64 kB or more
    its own mapping, returned on free, so that RSS follows the live tensors (by default glibc keeps freed memory of
    up to 32 MB a block for reuse, which hides a step's peak)."""
    import multiprocessing
    env = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        out = {}
        for stage in (2, 3):
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                out[stage] = pool.apply(mesh_side_child, (stage,))
        return out
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_") if env is None else os.environ.update(MALLOC_MMAP_THRESHOLD_=env)


def mem_row(stage, size, lora, params, trained, phases, renderer, attention, paper=None, measured=None):
    """One estimate. phases: name -> (activation bytes, renderer bytes); the step's peak is the phase where their
    sum is largest. Parameters and what training adds to them are alive in every phase."""
    peak_in, (act, rend) = max(phases.items(), key=lambda kv: sum(kv[1]))
    return dict(section="mem", stage=stage, resolution=size, lora_model=lora, params_gb=params / GB,
                grads_opt_gb=trained / GB, activations_gb=act / GB, renderer_gb=rend / GB, renderer=renderer(rend),
                peak_in=peak_in, estimate_gb=(params + trained + act + rend) / GB, measured_gb=measured,
                paper_gb=paper, attention=attention,
                phases_gb={name: [round(a / GB, 3), round(r / GB, 3)] for name, (a, r) in phases.items()})


def diffusion_side(lora):
    """Everything the estimates need from the diffusion models with eps_phi on `lora`, run on fake tensors: the
    phases of a VSD step on a 512-px render (stages 1 and 3: encode resizes every render to 512, so the prior's
    side is the same at every render size), of an SDS step (stage 2), of a --2d step on 8 latent particles and of
    its preview decode; and the models' bytes."""
    mode = FakeTensorMode()
    cfg, prior, eps_phi, opt_phi = fake_sd(lora, mode)
    with mode:
        image = torch.rand(1, 3, 512, 512).requires_grad_(True)               # the render x = g(theta, c)
        camera = prolific.sample_cameras(1, cfg, CPU)
        theta = torch.randn(cfg.batch_2d, 4, 64, 64).requires_grad_(True)     # --2d: 8 particles, SD latents
    encode = lambda: prior.encode(image)
    out = dict(prior=prior, eps_phi=eps_phi, opt_phi=opt_phi, mode=mode, theta_trained=trained_bytes([theta]))
    out["vsd"], ops = sd_step(prior, eps_phi, opt_phi, mode, encode, camera)
    out["sds"], _ = sd_step(prior, None, None, mode, encode, camera)
    out["two_d"], more = sd_step(prior, eps_phi, opt_phi, mode, lambda: theta[torch.randperm(len(theta))], None,
                                 batch=len(theta))
    with mode:  # --2d previews decode up to 16 particles at once, every preview_every steps
        _, out["two_d"]["preview"], _, _ = tracked(lambda: prolific.decode(prior, theta.detach()[:16]),
                                                   prior.unet, prior.vae)
    embeddings = (prior.emb_plain, prior.emb_views, prior.emb_negative)
    out.update(attention=attention_name(ops | more), sd=nbytes(prior.unet, prior.vae, *embeddings),
               models=nbytes(prior.unet, prior.vae, eps_phi, *embeddings),
               lora_trained=trained_bytes(eps_phi.trainable()))
    return out


def mem_rows(lora, d, mesh, field, card_gb, measured):
    """The estimates with eps_phi on `lora`: stage 1 at 64..512 px, stage 2 (once, it has no eps_phi), stage 3,
    --2d. d: diffusion_side(lora); mesh: measure_mesh_sides(); field: a stage-1 NeRFField (on meta)."""
    base, vsd, rows = prolific.Config(), d["vsd"], []
    nerf_trained = list(field.parameters())
    # Stage 1 (train_nerf). The render's budget: memory_budget on CUDA, a quarter of what is free, which at the
    # start of a step is the card less what stays from step to step (models, field, what training adds).
    params, trained = d["models"] + nbytes(field), d["lora_trained"] + trained_bytes(nerf_trained)
    budget = base.render_memory_gb * GB or (card_gb * GB - params - trained) // 4
    for size in (64, 128, 256, 512):
        plan = nerf_render_plan(base, size, budget)
        phases = {"render": (0, plan["render"]), "prior": (vsd["prior"], plan["prior"]),
                  "render bwd": (vsd["after"], plan["backward"]), "eps_phi": (vsd["eps_phi"], plan["eps_phi"])}
        rows.append(mem_row("1 NeRF, VSD", size, lora, params, trained, phases,
                            lambda b, path=plan["path"]: f"{b / GB:.2f} ({budget / GB:.1f}, {path})",
                            d["attention"], PAPER_GB[size], measured.get((lora, size))))
    # Stages 2-3 (train_mesh). run_mesh keeps the stage-1 field and its last gradient. The gradient of what a mesh
    # stage trains is inside the measured mesh figure; its Adam moments are counted here.
    was = lambda b: f"{b / GB:.2f} (measured)"
    m2, m3 = mesh[2], mesh[3]
    if lora == "default":  # stage 2: SDS, no eps_phi: the prior's UNet and VAE only
        rows.append(mem_row("2 geometry, SDS", 512, "-", d["sd"] + m2["dmtet"] + m2["nerf"],
                            2 * m2["trains"] + trained_bytes(nerf_trained, 1),
                            {"prior": (d["sds"]["prior"], m2["held"] * GB),
                             "mesh bwd": (d["sds"]["after"], m2["peak"] * GB)}, was, d["attention"], PAPER_MESH_GB))
    # stage 3: VSD with a fresh eps_phi, the prior's side as in stage 1; the DMTet frozen with stage 2's last gradient
    rows.append(mem_row("3 texture, VSD", 512, lora, d["models"] + m2["dmtet"] + m3["nerf"] + m3["tex"],
                        d["lora_trained"] + 2 * m3["trains"] + m2["trains"] + trained_bytes(nerf_trained, 1),
                        {"prior": (vsd["prior"], m3["held"] * GB), "mesh bwd": (vsd["after"], m3["peak"] * GB),
                         "eps_phi": (vsd["eps_phi"], m3["after"] * GB)}, was, d["attention"], PAPER_MESH_GB))
    # --2d (distill_images): the particles are latents, no VAE in the step, batch 8 through both UNets.
    two_d = d["two_d"]
    rows.append(mem_row("2D, VSD, 8 particles", 512, lora, d["models"], d["lora_trained"] + d["theta_trained"],
                        {"prior": (two_d["prior"], 0), "eps_phi": (two_d["eps_phi"], 0),
                         "preview": (two_d["preview"], 0)}, lambda b: "-", d["attention"]))
    return rows


def bench_mem(earlier_rows, card_gb):
    """ESTIMATED peak GPU memory of one step of stage 1 (VSD on a NeRF at 64..512 px; eps_phi on a second UNet, or
    --lora-model same), stage 2 (SDS on normal maps), stage 3 (VSD on the texture) and --2d (8 latent particles),
    fp16 SD-2.1-shaped models on a card_gb GB card, beside the paper's figures and the real peak where this run
    measured one (section 3 on a GPU). How: see the section's head comment."""
    t0 = time.perf_counter()
    measured = {(r["lora_model"], r["resolution"]): r["peak_alloc_gb"] for r in earlier_rows
                if r["section"] == "stage1" and r.get("peak_alloc_gb") is not None}
    mesh = measure_mesh_sides()
    print(f"\n(mem: measured the mesh stages' rasteriser and fields in {time.perf_counter() - t0:.0f} s)", flush=True)
    with META:
        field = prolific.NeRFField(prolific.Config())  # a stage-1 particle: hash grid, MLPs, background, occupancy
    rows, kernels = [], None
    for lora in ("default", "same"):
        d = diffusion_side(lora)
        rows += mem_rows(lora, d, mesh, field, card_gb, measured)
        kernels = kernels or dict(default=d["vsd"]["eps_phi"] / GB, math=math_attention_gb(d))
    print_mem(rows, card_gb, kernels, earlier_rows)
    print(f"  ({time.perf_counter() - t0:.0f} s)")
    return rows


def print_mem(rows, card_gb, kernels, earlier_rows):
    print_table(f"4. Peak GPU memory of one step, ESTIMATED without a GPU: fake tensors + MemTracker, fp16 "
                f"SD-2.1-shaped models, a {card_gb:.0f} GB card", rows, [
        ("stage", "stage", "{}"), ("resolution", "size", "{}"), ("lora_model", "lora model", "{}"),
        ("params_gb", "params GB", "{:.2f}"), ("grads_opt_gb", "grads+opt GB", "{:.2f}"),
        ("activations_gb", "activations GB", "{:.2f}"), ("renderer", "renderer GB (budget)", "{}"),
        ("peak_in", "peak in", "{}"), ("estimate_gb", "estimate GB", "{:.1f}"),
        ("measured_gb", "measured GB", "{:.1f}"), ("paper_gb", "paper GB", "{}"), ("attention", "attention", "{}")])
    base, cpu_budget = prolific.Config(), prolific.memory_budget(CPU)
    plan, nan = nerf_render_plan(base, 512, cpu_budget), float("nan")
    skip = {r["skipping"]: r["peak_gb"] for r in earlier_rows if r["section"] == "skip" and r.get("peak_gb")}
    rss = (f"section 2b of this run: skipping on {skip.get('on', nan):.2f}, off {skip.get('off', nan):.2f}"
           if skip else "section 2b as recorded in docs/measurements.md: skipping on 1.75, off 3.28")
    notes = [
        "params: frozen UNet(s) and VAE fp16, LoRA + camera MLP fp32, field / DMTet / texture field, text embeddings.",
        "grads+opt: gradients and Adam(W) moments kept from step to step. activations: the diffusion side at the",
        "step's peak, MemTracker on fake tensors. renderer: the NeRF renderer's own plan (SAMPLE_BYTES per sample,",
        f"all {base.n_samples}+{base.n_importance} samples of every ray, chunks under its budget: a quarter of what "
        "the card leaves free, or --render-memory;",
        "graph = one render with autograd, deferred = no-grad render + chunked re-render), or for the mesh stages the",
        "measured peak RSS of rasteriser + DMTet / texture field on this CPU (a sphere, ~115k faces, 512 px).",
        "peak in: the phase holding the most (render; prior = VAE + UNet passes + VAE backward; render/mesh bwd;",
        "eps_phi = the LoRA step; preview = 2D decode of the particles). size: render px (2D: 64x64 latents).",
        "attention: the SDPA kernel the fake CPU run took; CUDA's flash and mem-efficient kernels keep the same for",
        f"backward (output + log-sum-exp). On the math path an eps_phi step holds {kernels['math']:.2f} GB above the "
        f"models, not {kernels['default']:.2f}.",
        "Not counted: CUDA context, cuDNN/cuBLAS workspaces, allocator slack; compare with max_memory_allocated.",
        f"Renderer check, 512 px on this CPU (budget {cpu_budget / GB:.1f} GB): planned <= "
        f"{max(plan['render'], plan['backward']) / GB:.2f} GB; measured peak RSS in",
        f"{rss} GB.",
        f"paper (App. F, A100): stage 1 {'/'.join(map(str, PAPER_GB.values()))} GB at {'/'.join(map(str, PAPER_GB))} "
        f"px, mesh fine-tuning ~{PAPER_MESH_GB} GB at 512."]
    print("\n".join("  " + line for line in notes))


# -----------------------------------------------------------------------------
# 5. The first command on a GPU: `python bench.py --gpu-check` (at most about 8 minutes)


def gpu_check(device, model="random-sd21", scale=1.0, budget=470):
    """What no CPU could show, in one command and one table, within `budget` seconds: a few hundred steps of
    stage 1 + the mesh stages and of --2d with random SD models in fp16 (exit 0, outputs written, logs
    finite); torchrun with one process per GPU; a stage-1 step at 512 px with SD-2.1-shaped models (ms, peak
    memory); the test suite on this machine, with what time is left. scale shrinks the step counts and
    model picks the random model, for a rehearsal on a CPU (--model tiny, without the 512-px step and the suite)."""
    slow = 1 if model == "random-sd21" else 5  # a rehearsal on a CPU gets 5x the time
    folder, rows, deadline = tempfile.mkdtemp(prefix="gpu-check-"), [], time.perf_counter() + slow * budget
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    here, py = os.path.dirname(os.path.abspath(__file__)), sys.executable
    steps = lambda n: str(max(2, int(n * scale)))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 2

    def check(name, command, timeout, outputs=(), figures=lambda run: ""):
        start, timeout = time.perf_counter(), max(1, min(slow * timeout, deadline - time.perf_counter()))
        proc = subprocess.Popen(command, cwd=here, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group: torchrun's workers end with it
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            run = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
            code, last = run.returncode, ((stdout + stderr).strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            run, code, last = None, f"timeout ({timeout:.0f} s)", ""
        missing = [o for o in outputs if not glob.glob(os.path.join(folder, o))]
        ok = code == 0 and not missing
        note = figures(run) if ok else (f"exit {code}" + (f"; missing {', '.join(missing)}" if missing else "")
                                        + (f": {last[-100:]}" if last else ""))
        rows.append(dict(section="gpu-check", check=name, result="ok" if ok else "FAIL",
                         seconds=time.perf_counter() - start, figures=note))
        print(f"  {name}: {rows[-1]['result']} ({rows[-1]['seconds']:.0f} s) {note}", flush=True)

    def finite_log(out):  # every number stage 1, the 2D mode and the mesh stages logged is finite
        def figures(run):
            text = "".join(Path(p).read_text() for p in glob.glob(os.path.join(folder, out, "**", "log.txt"), recursive=True))
            bad = len(re.findall(r"\b(nan|inf)\b", text, re.I))
            return f"{len(text.splitlines())} log lines, " + ("all finite" if not bad else f"{bad} NaN/inf")
        return figures

    run_prolific = [py, "prolific.py", "--model", model, "--device", device.type]
    if model != "random-sd21":  # a rehearsal on a CPU: 32-px renders and turntables (512 px takes minutes)
        run_prolific += ["--resolution", "32"]
    check(f"stage 1 + mesh, {model}", [*run_prolific, "a blue tulip", "--mesh", "--steps", steps(300),
                                       "--geometry-steps", steps(100), "--texture-steps", steps(100),
                                       "--tet-resolution", "64", "--texture-size", "512", "--save-every", steps(100),
                                       "--preview-every", steps(100), "--out", os.path.join(folder, "mesh")], 150,
          ["mesh/checkpoint.pt", "mesh/particle0/turntable.*", "mesh/particle0/mesh.glb"], finite_log("mesh"))
    def finite_particles(run):  # the 2D mode logs every 500 steps: its particles are checked instead
        theta = torch.load(os.path.join(folder, "2d", "particles.pt"), weights_only=True)
        return f"particles {tuple(theta.shape)}, " + ("all finite" if theta.isfinite().all() else "NaN/inf")

    check(f"--2d, {model}", [*run_prolific, "a hamburger", "--2d", "--steps", steps(200), "--particles", "4",
                             "--out", os.path.join(folder, "2d")], 90, ["2d/particles.png", "2d/particles.pt"],
          finite_particles)
    check(f"torchrun, {gpus} process(es)", [py, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
                                            *run_prolific[1:], "a blue tulip", "--steps", steps(50),
                                            "--particles", str(gpus), "--out", os.path.join(folder, "torchrun")], 90,
          ["torchrun/checkpoint.pt", *[f"torchrun/particle{k}/turntable.*" for k in range(gpus)]],
          finite_log("torchrun"))
    bench_json = os.path.join(folder, "bench.json")
    if model != "random-sd21":  # a rehearsal: the 512-px step (minutes on a CPU) and the suite are left out
        return rows
    check("stage-1 step at 512, SD-2.1-shaped, and the estimates", [py, "bench.py", "--only", "stage1,mem", "--stage1-res", "512",
                                                 "--stage1-lora", "default", "--device", device.type,
                                                 "--json", bench_json], 200, ["bench.json"],
          lambda run: stage1_figures(bench_json))
    check("test suite", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_prolific.py"], 300,
          figures=lambda run: run.stdout.strip().splitlines()[-1])
    print_table(f"5. GPU check on {header(device)['device_name']} (outputs in {folder})", rows, [
        ("check", "check", "{}"), ("result", "result", "{}"), ("seconds", "s", "{:.0f}"), ("figures", "figures", "{}")])
    return rows


def stage1_figures(path):
    """ms per step and peak memory of bench.json's stage-1 rows, with section 4's estimate beside each."""
    rows = json.load(open(path))["rows"]
    estimate = {(r["resolution"], r["lora_model"]): r["estimate_gb"] for r in rows
                if r.get("section") == "mem" and r["stage"].startswith("1 ")}
    return "; ".join(f"{r['resolution']} px: {r['ms_per_step'] or 0:.0f} ms/step, peak "
                     + ("-" if r["peak_alloc_gb"] is None else f"{r['peak_alloc_gb']:.1f} GB allocated")
                     + f" (estimate {estimate.get((r['resolution'], r['lora_model']), float('nan')):.1f} GB)"
                     for r in rows if r.get("section") == "stage1")


# -----------------------------------------------------------------------------
# Command line


SECTIONS = ("hashgrid", "tets", "raster", "render", "skip", "refresh", "stage1", "mem")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stage1-res", default=None, help="render sizes for section 3 (default CPU: 64, GPU: 64,128,256,512)")
    p.add_argument("--stage1-lora", default=None, help="lora models for section 3: default,same (default CPU: default)")
    p.add_argument("--mem-card-gb", type=float, default=None,
                   help=f"card size the mem estimates assume (default: this GPU's, else {GOAL_GB})")
    p.add_argument("--json", default=None, metavar="PATH", help="write the header and all rows as JSON")
    p.add_argument("--gpu-check", action="store_true",
                   help="the first command on a GPU: short runs of every mode, torchrun, a 512-px step, the tests")
    p.add_argument("--model", default="random-sd21", help="--gpu-check's random model (tiny: a rehearsal on a CPU)")
    p.add_argument("--scale", type=float, default=1.0, help="--gpu-check's step counts times this")
    args = p.parse_args(argv)
    only = args.only.split(",")
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {','.join(sorted(unknown))}; choose from {','.join(SECTIONS)}")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    stage1_res = [int(r) for r in args.stage1_res.split(",")] if args.stage1_res else ([64, 128, 256, 512] if gpu else [64])
    stage1_lora = args.stage1_lora.split(",") if args.stage1_lora else (["default", "same"] if gpu else ["default"])

    info = header(device)
    print(f"bench.py on {info['device_name']} ({info['device']}); torch {info['torch']}, diffusers "
          f"{info['diffusers']}; {info['threads']} torch threads, {info['cpu_count']} CPUs, "
          f"load average {info['load_average']}; {info['date']}")
    rows, start = [], time.perf_counter()
    if args.gpu_check:
        rows += gpu_check(device, args.model, args.scale)
        only = []
    if "hashgrid" in only:
        rows += bench_hashgrid(device, [2**16, 2**18, 2**20] if gpu else [2**16, 2**18], repeats=10 if gpu else 3)
    if "tets" in only:
        free(device)
        rows += bench_tets(device, [64, 128], repeats=10 if gpu else 3)
    if "raster" in only:
        free(device)
        rows += bench_raster(device, [20_000, 200_000], repeats=10 if gpu else 3)
    if "render" in only:
        free(device)
        rows += bench_render(device, [128, 256, 512] if gpu else [64, 128], repeats=5 if gpu else 3)
    if "skip" in only:
        free(device)
        rows += bench_skip(device, [128, 256], repeats=5 if gpu else 3, train_steps=300)
    if "refresh" in only:
        rows += bench_refresh()
    if "stage1" in only:
        # On a CPU one step takes minutes (two 866M UNets and the VAE at 512 px): 2 steps, no warm-up.
        rows += bench_stage1(device, stage1_res, steps=5 if gpu else 2, warmup=1 if gpu else 0, lora_models=stage1_lora)
    if "mem" in only:
        card_gb = args.mem_card_gb or (torch.cuda.get_device_properties(device).total_memory / GB if gpu else GOAL_GB)
        rows += bench_mem(rows, card_gb)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": info, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
