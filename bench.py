"""Speed and memory of ProlificDreamer's pieces, measured side by side in one run.

    python bench.py                              # all sections; on a CPU small sizes only (~6-12 min)
    python bench.py --only hashgrid,render       # some sections: hashgrid tets raster render skip stage1
    python bench.py --json rows.json             # also write the header and every row as JSON
    python bench.py --gpu-check                  # the first command on a GPU (section 4; about 8 minutes)

1. building blocks: HashGrid vs a naive per-level grid; marching tets; the mesh rasteriser
2. the volume renderer: a no-grad render, and the training pattern (no-grad render + deferred backward);
   2b. skipping empty space on vs off on a trained known-scene field: lookups per pixel, ms, peak memory, PSNR
3. one full stage-1 VSD step with Stable-Diffusion-2.1-shaped random models, ms and peak GPU memory
4. --gpu-check: short runs of every mode with random SD models, torchrun, a 512-px step, the test suite

Every time is the median over repeats after a warm-up, with torch.cuda.synchronize around each timed
call on a GPU. Peak memory is torch.cuda.max_memory_allocated (and _reserved, closer to what nvidia-smi
shows) after reset_peak_memory_stats; on a CPU it is not measured. On a GPU the frozen models are fp16, as
prolific.py makes them. These are measurements, never asserted by the tests: on a shared machine
absolute times are noisy, so compare the ratios (taken within one run, with the compared versions
interleaved).
"""
import argparse
import gc
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import prolific
from hashgrid import HashGrid
from marching_tets import marching_tets, tet_grid

from prolific import Camera, render_mesh

PAPER_GB = {64: 17, 128: 17, 256: 18, 512: 27}  # the authors' stage-1 memory at each render size
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


def peak_rss_child(state, cfg, on, size, grad_rgb):
    """In a fresh process: the NeRF side of one step at size px; returns its peak RSS above the RSS before, GB."""
    def rss(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024
    field = prolific.NeRFField(cfg)
    field.load_state_dict(state)
    one = torch.ones(1)
    camera = Camera.orbit(20 * one, 37 * one, 1.25 * one, 55 * one)
    before = rss("VmRSS:")
    nerf_step(field, cfg, camera, size, grad_rgb, on)
    return (rss("VmHWM:") - before) / 2**30


def bench_skip(device, sizes, repeats, train_steps, memory_size=512, settle=8):
    """Side by side, skipping on vs off, on one trained known-scene field: field lookups per pixel and step
    (forward and backward; the grid's refresh, R^3 lookups every `occupancy_every` steps, spread over the
    steps), NeRF-side ms per step (median), renderer peak memory at memory_size, and the held-out PSNR of a
    field trained with skipping on vs off."""
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
    print(f"\n(2b: trained two known-scene fields, {train_steps} steps each, in {time.perf_counter() - t0:.0f} s; "
          f"{base.occupancy_resolution}^3 grid {field.occupancy.mask.float().mean():.1%} visited)", flush=True)
    field = field.to(device)
    one = torch.ones(1, device=device)
    camera = Camera.orbit(20 * one, 37 * one, 1.25 * one, 55 * one)
    refresh_lookups = base.occupancy_resolution ** 3 / base.occupancy_every
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
# 4. The first command on a GPU: `python bench.py --gpu-check` (at most about 8 minutes)


def gpu_check(device, model="random-sd21", scale=1.0, budget=470):
    """What no CPU could show, in one command and one table, within `budget` seconds: a few hundred steps of
    stage 1 + the mesh stages and of --2d with random SD models in fp16 (exit 0, outputs written, logs
    finite); torchrun with one process per GPU; a stage-1 step at 512 px with SD-2.1-shaped models (ms, peak
    memory); the test suite on this machine, with what time is left. scale shrinks the step counts and
    model picks the random model, for a rehearsal on a CPU (--model tiny, without the 512-px step and the suite)."""
    folder, rows, deadline = tempfile.mkdtemp(prefix="gpu-check-"), [], time.perf_counter() + budget
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    here, py = os.path.dirname(os.path.abspath(__file__)), sys.executable
    steps = lambda n: str(max(2, int(n * scale)))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 2

    def check(name, command, timeout, outputs=(), figures=lambda run: ""):
        start, timeout = time.perf_counter(), max(1, min(timeout, deadline - time.perf_counter()))
        try:
            run = subprocess.run(command, cwd=here, env=env, capture_output=True, text=True, timeout=timeout)
            code, last = run.returncode, ((run.stdout + run.stderr).strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
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
    check(f"stage 1 + mesh, {model}", [*run_prolific, "a blue tulip", "--mesh", "--steps", steps(300),
                                       "--geometry-steps", steps(100), "--texture-steps", steps(100),
                                       "--tet-resolution", "64", "--texture-size", "512", "--save-every", steps(100),
                                       "--preview-every", steps(100), "--out", os.path.join(folder, "mesh")], 150,
          ["mesh/checkpoint.pt", "mesh/particle0/turntable.*", "mesh/particle0/mesh.glb"], finite_log("mesh"))
    check(f"--2d, {model}", [*run_prolific, "a hamburger", "--2d", "--steps", steps(200), "--particles", "4",
                             "--out", os.path.join(folder, "2d")], 90, ["2d/particles.png"], finite_log("2d"))
    check(f"torchrun, {gpus} process(es)", [py, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
                                            *run_prolific[1:], "a blue tulip", "--steps", steps(50),
                                            "--particles", str(gpus), "--out", os.path.join(folder, "torchrun")], 90,
          ["torchrun/checkpoint.pt", *[f"torchrun/particle{k}/turntable.*" for k in range(gpus)]],
          finite_log("torchrun"))
    bench_json = os.path.join(folder, "bench.json")
    if model != "random-sd21":  # a rehearsal: the 512-px step (minutes on a CPU) and the suite are left out
        return rows
    check("stage-1 step at 512, SD-2.1-shaped", [py, "bench.py", "--only", "stage1", "--stage1-res", "512",
                                                 "--stage1-lora", "default", "--device", device.type,
                                                 "--json", bench_json], 120, ["bench.json"],
          lambda run: stage1_figures(bench_json))
    check("test suite", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_prolific.py"], 300,
          figures=lambda run: run.stdout.strip().splitlines()[-1])
    print_table(f"4. GPU check on {header(device)['device_name']} (outputs in {folder})", rows, [
        ("check", "check", "{}"), ("result", "result", "{}"), ("seconds", "s", "{:.0f}"), ("figures", "figures", "{}")])
    return rows


def stage1_figures(path):
    """ms per step and peak memory of bench.json's stage-1 rows, for the GPU check's table."""
    rows = [r for r in json.load(open(path))["rows"] if r.get("section") == "stage1"]
    return "; ".join(f"{r['resolution']} px: {r['ms_per_step'] or 0:.0f} ms/step, peak "
                     + ("-" if r["peak_reserved_gb"] is None else f"{r['peak_reserved_gb']:.1f} GB reserved")
                     for r in rows)


# -----------------------------------------------------------------------------
# Command line


SECTIONS = ("hashgrid", "tets", "raster", "render", "skip", "stage1")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stage1-res", default=None, help="render sizes for section 3 (default CPU: 64, GPU: 64,128,256,512)")
    p.add_argument("--stage1-lora", default=None, help="lora models for section 3: default,same (default CPU: default)")
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
    if "stage1" in only:
        # On a CPU one step takes minutes (two 866M UNets and the VAE at 512 px): 2 steps, no warm-up.
        rows += bench_stage1(device, stage1_res, steps=5 if gpu else 2, warmup=1 if gpu else 0, lora_models=stage1_lora)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": info, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
