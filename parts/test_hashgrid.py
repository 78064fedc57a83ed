"""Tests for hashgrid.HashGrid against a slow, obviously-correct reference."""

import itertools
import math

import pytest
import torch

from hashgrid import HashGrid

# Small config: T = 2**9 rows per level, so levels 0-1 (res 4, 7: 64 and 343
# rows) are dense and levels 2-3 (res 11, 16) are hashed.
HASHGRID_SMALL = dict(n_levels=4, n_features=2, log2_table_size=9, base_resolution=4, max_resolution=16)


def hashgrid_reference(x, tables, base_resolution, max_resolution, log2_table_size):
    """Straight from the tcnn rules: per level, per corner, plain table[idx] and an explicit trilinear weight."""
    n_levels = len(tables)
    growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / (n_levels - 1))
    T = 2**log2_table_size
    out = []
    for level, table in enumerate(tables):
        scale = base_resolution * growth**level - 1
        res = math.ceil(round(scale, 6)) + 1
        pos = x * scale + 0.5
        cell = pos.floor().long()
        frac = pos - pos.floor()
        level_out = torch.zeros(x.shape[0], table.shape[1])
        for dx, dy, dz in itertools.product((0, 1), repeat=3):
            cx, cy, cz = cell[:, 0] + dx, cell[:, 1] + dy, cell[:, 2] + dz
            if res**3 <= T:
                idx = (cx + cy * res + cz * res * res) % res**3  # wraps the x = 1 edge
            else:
                h = (cx * 1) ^ (cy * 2654435761) ^ (cz * 805459861)
                idx = (h & 0xFFFFFFFF) % T
            wx = frac[:, 0] if dx else 1 - frac[:, 0]
            wy = frac[:, 1] if dy else 1 - frac[:, 1]
            wz = frac[:, 2] if dz else 1 - frac[:, 2]
            level_out = level_out + (wx * wy * wz).unsqueeze(-1) * table[idx]
        out.append(level_out)
    return torch.cat(out, dim=-1)


def _hashgrid_points(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g)
    corners = torch.tensor(list(itertools.product((0.0, 1.0), repeat=3)))  # the 8 cube corners
    edges = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.3], [0.25, 1.0, 0.0]])
    return torch.cat([x, corners, edges])


def _hashgrid_small(seed=0, n_features=2):
    torch.manual_seed(seed)
    grid = HashGrid(**{**HASHGRID_SMALL, "n_features": n_features})
    with torch.no_grad():  # larger than the 1e-4 init so differences are visible
        for table in grid.tables:
            table.uniform_(-1, 1)
    return grid


def test_hashgrid_small_config_has_dense_and_hashed_levels():
    grid = _hashgrid_small()
    assert grid.dense == [True, True, False, False]
    assert grid.resolutions == [4, 7, 11, 16]
    assert [t.shape[0] for t in grid.tables] == [64, 343, 512, 512]


# n_features == 2 takes the float64-view gather, others the plain row gather.
@pytest.mark.parametrize("n_features", [2, 4])
def test_hashgrid_forward_matches_reference(n_features):
    grid = _hashgrid_small(n_features=n_features)
    x = _hashgrid_points()
    ref = hashgrid_reference(x, list(grid.tables), 4, 16, 9)
    out = grid(x)
    assert out.shape == (x.shape[0], 4 * n_features) and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_features", [2, 4])
def test_hashgrid_table_gradients_match_reference(n_features):
    grid = _hashgrid_small(n_features=n_features)
    x = _hashgrid_points(seed=1)
    upstream = torch.randn(x.shape[0], grid.out_dim)
    (grid(x) * upstream).sum().backward()
    ours = [t.grad.clone() for t in grid.tables]

    tables = [t.detach().clone().requires_grad_() for t in grid.tables]
    (hashgrid_reference(x, tables, 4, 16, 9) * upstream).sum().backward()
    for level, (g, t) in enumerate(zip(ours, tables)):
        assert torch.allclose(g, t.grad, atol=1e-5, rtol=1e-5), level


def test_hashgrid_default_resolutions_and_shape():
    grid = HashGrid()
    assert grid.resolutions[0] == 16 and grid.resolutions[-1] == 2048
    growth = math.exp(math.log(2048 / 16) / 15)
    assert grid.resolutions == [math.ceil(round(16 * growth**level - 1, 6)) + 1 for level in range(16)]
    assert all(t.shape[0] == min(2**19, r**3) for t, r in zip(grid.tables, grid.resolutions))
    assert grid.out_dim == 32
    out = grid(torch.rand(50, 3))
    assert out.shape == (50, 32) and out.dtype == torch.float32


def test_hashgrid_dense_level_has_no_collisions():
    grid = HashGrid(**HASHGRID_SMALL)
    offsets = torch.tensor(list(itertools.product((0, 1), repeat=3))).flip(-1)  # (8, 3) (dx, dy, dz) of corner k
    for level in (0, 1):
        assert grid.dense[level]
        res = grid.resolutions[level]
        # One point inside every cell, away from the +0.5 wrap-around edge, so
        # the corners visited are exactly the res^3 lattice points.
        cells = torch.tensor(list(itertools.product(range(res - 1), repeat=3)), dtype=torch.float32)
        x = (cells + 0.25) / grid.scales[level]  # pos = cell + 0.75 -> floor(pos) == cell
        rows = grid._corners(x.t().contiguous(), level)[0].t()  # (N, 8)
        lattice = cells.long().unsqueeze(1) + offsets  # (N, 8, 3)
        row_of = {}
        for point, row in zip(lattice.reshape(-1, 3).tolist(), rows.reshape(-1).tolist()):
            assert row_of.setdefault(tuple(point), row) == row  # same lattice point -> same row
        assert len(row_of) == res**3
        assert sorted(row_of.values()) == list(range(res**3))  # distinct points -> distinct rows


def test_hashgrid_weights_sum_to_one():
    grid = _hashgrid_small()
    x = _hashgrid_points()
    for level in range(grid.n_levels):
        _, w = grid._corners(x.t().contiguous(), level)  # (8, N)
        assert torch.allclose(w.sum(0), torch.ones(x.shape[0]))


def test_hashgrid_trains_with_adamw():
    torch.manual_seed(0)
    grid = HashGrid(**HASHGRID_SMALL)  # default init near 0, as in training
    x = _hashgrid_points()
    target = torch.randn(x.shape[0], grid.out_dim) * 0.1
    opt = torch.optim.AdamW(grid.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (grid(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]  # ~0.47 in practice: collisions keep it from reaching 0


def test_hashgrid_state_dict_round_trip_and_no_input_grad():
    a, b = _hashgrid_small(0), HashGrid(**HASHGRID_SMALL)
    b.load_state_dict(a.state_dict())
    x = _hashgrid_points().requires_grad_()
    out = b(x)
    assert torch.equal(out, a(x))
    assert torch.autograd.grad(out.sum(), x, allow_unused=True)[0] is None  # tables only
