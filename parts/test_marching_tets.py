"""Tests for marching_tets.py against known answers: the cube's volume, analytic spheres, tori and planes.

CPU only, small grids (well under 30 s on 2 cores). Run: python -m pytest -q parts/test_marching_tets.py
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))            # marching_tets.py sits one level up
from marching_tets import DMTet, marching_tets, tet_grid  # noqa: E402


def sphere(p, radius=0.6):
    return p.norm(dim=-1) - radius


def torus(p, R=0.6, r=0.25):
    ring = torch.stack([p[:, :2].norm(dim=-1) - R, p[:, 2]], -1)         # distance to the ring in its plane
    return ring.norm(dim=-1) - r


def ball_density(p):
    """The paper's object density init, 10 (1 - |x| / 0.5), clipped at 0."""
    return 10 * (1 - p.norm(dim=-1) / 0.5).clamp(min=0)


def signed_volume(vertices, faces):
    """Divergence theorem: sum over faces of det(p0, p1, p2) / 6; positive iff faces point outward."""
    return torch.linalg.det(vertices[faces].double()).sum().item() / 6


def edge_counts(faces):
    """(number of undirected edges, how often each undirected edge is used, how often each directed one is)."""
    directed = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])   # (3F, 2)
    n = int(faces.max()) + 1
    undirected = directed.amin(1) * n + directed.amax(1)
    _, undirected_counts = torch.unique(undirected, return_counts=True)
    _, directed_counts = torch.unique(directed[:, 0] * n + directed[:, 1], return_counts=True)
    return len(undirected_counts), undirected_counts, directed_counts


def assert_closed_oriented(vertices, faces):
    """Watertight 2-manifold with consistent winding: each edge in exactly two faces, once each way."""
    _, undirected_counts, directed_counts = edge_counts(faces)
    assert (undirected_counts == 2).all()
    assert (directed_counts == 1).all()
    assert torch.equal(torch.unique(faces), torch.arange(len(vertices)))   # no unused vertices


def euler_characteristic(vertices, faces):
    n_edges, _, _ = edge_counts(faces)
    return len(vertices) - n_edges + len(faces)


# ---------------------------------------------------------------------------------------------------------
# tet_grid
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("res", [1, 2, 5])
def test_tets_grid_counts_and_volume(res):
    vertices, tets = tet_grid(res)
    assert vertices.shape == ((res + 1) ** 3, 3) and vertices.dtype == torch.float32
    assert tets.shape == (6 * res ** 3, 4) and tets.dtype == torch.long
    assert vertices.min() == -1 and vertices.max() == 1
    p = vertices[tets].double()
    volume = torch.linalg.det(p[:, 1:] - p[:, :1]) / 6
    assert torch.allclose(volume, torch.full_like(volume, (2 / res) ** 3 / 6))   # all equal and positive
    assert volume.sum().item() == pytest.approx(8.0)


def test_tets_grid_is_conforming():
    """Neighbouring cubes' faces match: each inner triangle is shared by 2 tets, each outer one bounds 1."""
    res = 3
    _, tets = tet_grid(res)
    triangles = torch.cat([tets[:, [0, 1, 2]], tets[:, [0, 1, 3]], tets[:, [0, 2, 3]], tets[:, [1, 2, 3]]])
    _, counts = torch.unique(triangles.sort(1).values, dim=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2}
    assert (counts == 1).sum() == 6 * 2 * res ** 2                        # 2 triangles per outer cube face


# ---------------------------------------------------------------------------------------------------------
# marching_tets
# ---------------------------------------------------------------------------------------------------------

def test_tets_plane_is_exact_and_faces_point_outward():
    """A linear sdf is reproduced exactly, and every face's normal points toward sdf > 0."""
    vertices, tets = tet_grid(6)
    normal = torch.tensor([0.3, -0.5, 0.8])
    normal = normal / normal.norm()
    mesh_vertices, faces = marching_tets(vertices, tets, vertices @ normal - 0.1)
    assert len(faces) > 0
    assert torch.allclose(mesh_vertices @ normal, torch.full((len(mesh_vertices),), 0.1), atol=1e-5)
    p = mesh_vertices[faces]
    face_normals = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    assert (face_normals @ normal > 0).all()


@pytest.mark.parametrize("sdf_fn, euler, volume", [
    (sphere, 2, 4 / 3 * math.pi * 0.6 ** 3),
    (torus, 0, 2 * math.pi ** 2 * 0.6 * 0.25 ** 2),
])
def test_tets_closed_surfaces(sdf_fn, euler, volume):
    res = 32
    vertices, tets = tet_grid(res)
    mesh_vertices, faces = marching_tets(vertices, tets, sdf_fn(vertices))
    assert faces.dtype == torch.long and mesh_vertices.shape[1] == 3
    assert_closed_oriented(mesh_vertices, faces)
    assert euler_characteristic(mesh_vertices, faces) == euler
    assert signed_volume(mesh_vertices, faces) == pytest.approx(volume, rel=0.03)   # > 0: outward
    assert sdf_fn(mesh_vertices).abs().max() < 0.5 * 2 / res             # within half a cell of the surface


def test_tets_sdf_exactly_zero_at_grid_vertices():
    """sdf == 0 exactly at grid vertices counts as outside and still gives a closed surface."""
    vertices, tets = tet_grid(10)
    sdf = sphere(vertices, radius=0.6)
    assert (sdf == 0).sum() == 6                                          # (+-0.6, 0, 0) and permutations
    mesh_vertices, faces = marching_tets(vertices, tets, sdf)
    assert_closed_oriented(mesh_vertices, faces)
    assert euler_characteristic(mesh_vertices, faces) == 2


def test_tets_any_corner_order_gives_the_same_outward_surface():
    """marching_tets takes generic tets: listing each tet's corners in a random order changes nothing."""
    vertices, tets = tet_grid(12)
    sdf = torus(vertices)
    shuffled = tets.gather(1, torch.rand(tets.shape, generator=torch.Generator().manual_seed(0)).argsort(1))
    expected_vertices, expected_faces = marching_tets(vertices, tets, sdf)
    mesh_vertices, faces = marching_tets(vertices, shuffled, sdf)
    assert torch.equal(mesh_vertices, expected_vertices)
    assert_closed_oriented(mesh_vertices, faces)
    assert signed_volume(mesh_vertices, faces) == pytest.approx(signed_volume(expected_vertices, expected_faces))


def test_tets_gradients_flow_to_sdf_and_vertices():
    vertices, tets = tet_grid(8)
    vertices.requires_grad_(True)
    sdf = sphere(vertices.detach()).requires_grad_(True)
    mesh_vertices, _ = marching_tets(vertices, tets, sdf)
    mesh_vertices.sum().backward()
    for grad in (vertices.grad, sdf.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_tets_gradcheck():
    """The crossing formula's gradient matches finite differences (topology is fixed for small steps)."""
    vertices, tets = tet_grid(2)
    vertices = (vertices.double() + 0.05 * torch.randn(len(vertices), 3, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64)).requires_grad_(True)
    sdf = sphere(vertices.detach(), radius=0.7).requires_grad_(True)
    assert sdf.abs().min() > 1e-3                                         # no sign flips under the probe steps
    assert torch.autograd.gradcheck(lambda v, s: marching_tets(v, tets, s)[0], (vertices, sdf))


@pytest.mark.parametrize("value", [1.0, -1.0])
def test_tets_no_crossing_returns_empty(value):
    vertices, tets = tet_grid(4)
    mesh_vertices, faces = marching_tets(vertices, tets, torch.full((len(vertices),), value))
    assert mesh_vertices.shape == (0, 3) and mesh_vertices.dtype == vertices.dtype
    assert faces.shape == (0, 3) and faces.dtype == torch.long


# ---------------------------------------------------------------------------------------------------------
# DMTet
# ---------------------------------------------------------------------------------------------------------

def test_dmtet_from_density_fits_box_around_ball():
    threshold = 1.0                                                       # surface at |x| = 0.5 (1 - 1/10)
    model = DMTet(24, density_fn=ball_density, bound=1.0, threshold=threshold)
    assert model.centre.abs().max() < 1e-6
    assert (model.scale >= 0.5).all() and (model.scale <= 0.7).all()
    mesh_vertices, faces = model()
    assert_closed_oriented(mesh_vertices, faces)
    assert euler_characteristic(mesh_vertices, faces) == 2
    radius = 0.5 * (1 - threshold / 10)
    assert signed_volume(mesh_vertices, faces) == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.05)


def test_dmtet_density_reaching_the_bound_still_gives_a_closed_mesh():
    """A NeRF's density often reaches the bound (here a slab filling z < 0); the grid's outer vertices start
    outside, so the first mesh is closed rather than cut open by the box."""
    model = DMTet(8, density_fn=lambda p: (-20 * p[:, 2]).clamp(min=0), threshold=1.0)
    assert torch.allclose(model.scale[:2], torch.ones(2))               # x, y: the box is the whole bound
    mesh_vertices, faces = model()
    assert_closed_oriented(mesh_vertices, faces)
    assert signed_volume(mesh_vertices, faces) > 0


@pytest.mark.parametrize("density_fn, where", [
    (lambda p: torch.zeros(len(p)), "density <= threshold"),
    (lambda p: torch.full((len(p), 1), 100.0), "density > threshold"),      # (N, 1) is accepted too
])
def test_dmtet_density_without_surface_raises(density_fn, where):
    with pytest.raises(ValueError, match=f"stage-1 density has no surface: {where}.* everywhere"):
        DMTet(8, density_fn=density_fn, threshold=10.0)


def test_dmtet_from_sdf_trains_sdf_and_deform():
    model = DMTet.from_sdf(16, sphere)
    vertices = model.vertices()
    assert torch.allclose(model.sdf, sphere(vertices))
    mesh_vertices, faces = model()
    assert_closed_oriented(mesh_vertices, faces)
    mesh_vertices.norm(dim=-1).sum().backward()
    for grad in (model.sdf.grad, model.deform.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_dmtet_deformation_stays_within_half_a_cell():
    res = 8
    model = DMTet(res, bound=2.0)
    with torch.no_grad():
        model.deform.fill_(100.0)                                         # tanh saturates at 1
    offset = model.vertices() - 2.0 * model.grid
    assert offset.abs().max() <= 2.0 / res + 1e-6                         # half of a 2*bound/res cell


def test_dmtet_state_dict_roundtrip():
    """The box and the parameters are saved; the grid is rebuilt from the resolution."""
    model = DMTet(12, density_fn=ball_density, threshold=1.0)
    with torch.no_grad():
        model.deform.normal_()
    loaded = DMTet(12)
    loaded.load_state_dict(model.state_dict())
    for a, b in zip(model(), loaded()):
        assert torch.equal(a, b)
