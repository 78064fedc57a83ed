import math

import torch

from parts.raster import Camera, render_mesh


def icosphere(subdivisions, radius=1.0):
    """Unit icosahedron subdivided `subdivisions` times (20 * 4**s faces), outward winding."""
    t = (1 + 5 ** 0.5) / 2
    verts = torch.tensor([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                          [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], dtype=torch.float64)
    faces = torch.tensor([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                          [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                          [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]])
    verts = verts / verts.norm(dim=-1, keepdim=True)
    for _ in range(subdivisions):
        # One new vertex per unique edge, shared by the two faces on either side.
        edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
        unique, mid = torch.unique(edges, dim=0, return_inverse=True)
        new = verts[unique].mean(1)
        mid = mid.view(3, -1).T + len(verts)                         # (F,3): midpoints of edges 01, 12, 20
        verts = torch.cat([verts, new / new.norm(dim=-1, keepdim=True)])
        a, b, c = faces.T
        ab, bc, ca = mid.T
        faces = torch.cat([torch.stack(f, 1) for f in ([a, ab, ca], [ab, b, bc], [ca, bc, c], [ab, bc, ca])])
    outward = (torch.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]], dim=-1)
               * verts[faces].mean(1)).sum(-1) > 0
    assert outward.all()
    return (radius * verts).float(), faces


def orbit(distance=3.0, elevation=20.0, azimuth=30.0, fovy=60.0):
    one = torch.ones(1)
    return Camera.orbit(elevation * one, azimuth * one, distance * one, fovy * one)


def disk_area(radius, distance, camera, height):
    """Pixel area of a sphere's projection: a disk of angular radius asin(r / d)."""
    pixels = camera.focal(height)[0] * math.tan(math.asin(radius / distance))
    return math.pi * float(pixels) ** 2


def test_raster_sphere_coverage_matches_disk():
    verts, faces = icosphere(4)
    camera = orbit()
    out = render_mesh(verts, faces, camera, 128, 128)
    assert out["mask"].shape == (1, 1, 128, 128)
    assert out["mask"].min() >= 0 and out["mask"].max() <= 1
    area = disk_area(1.0, 3.0, camera, 128)
    assert abs(out["mask"].sum().item() - area) < 0.02 * area
    # The soft mask and the hard z-buffer agree about which pixels are covered.
    assert torch.equal(out["mask"][:, 0] >= 0.5, out["face_id"] >= 0)


def test_raster_normals_and_depth():
    verts, faces = icosphere(4)
    camera = orbit()
    for smooth in (False, True):
        out = render_mesh(verts, faces, camera, 64, 64, smooth_normals=smooth)
        covered = out["face_id"] >= 0                                 # (1,64,64)
        length = out["normal"].norm(dim=1)
        assert torch.allclose(length[covered], torch.ones(()), atol=1e-4)
        assert (out["normal"].abs().sum(1)[~covered] == 0).all()
        assert (out["depth"][:, 0][~covered] == 0).all() and (out["position"].abs().sum(1)[~covered] == 0).all()
        back = camera.c2w[0, :3, 2]                                   # camera +z: towards the viewer
        centre = out["normal"][0, :, 31:33, 31:33].mean((1, 2))
        assert torch.dot(centre, back) > 0.99
        assert abs(out["depth"][0, 0, 31:33, 31:33].mean().item() - 2.0) < 0.01  # d - r
        # Positions lie on the (slightly faceted) sphere and the perspective-correct barycentrics sum to 1.
        radius = out["position"].norm(dim=1)[covered]
        assert ((radius > 0.99) & (radius < 1.0001)).all()
        assert torch.allclose(out["bary"].sum(1)[covered], torch.ones(()), atol=1e-5)
        # Each position projects back onto its pixel centre (u = W/2 + f x / -z, v = H/2 - f y / -z).
        cam = (out["position"][0].permute(1, 2, 0)[covered[0]] - camera.c2w[0, :3, 3]) @ camera.c2w[0, :3, :3]
        focal = camera.focal(64)[0]
        rows, cols = covered[0].nonzero().T
        assert torch.allclose(32 + focal * cam[:, 0] / -cam[:, 2], cols + 0.5, atol=1e-3)
        assert torch.allclose(32 - focal * cam[:, 1] / -cam[:, 2], rows + 0.5, atol=1e-3)
        assert torch.allclose(-cam[:, 2], out["depth"][0, 0][covered[0]], atol=1e-5)


def test_raster_normal_loss_gives_vertex_gradients():
    verts, faces = icosphere(3)
    verts.requires_grad_(True)
    out = render_mesh(verts, faces, orbit(), 64, 64)
    target = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    (out["normal"] * target).sum().backward()
    assert torch.isfinite(verts.grad).all() and verts.grad.abs().sum() > 0


def test_raster_mask_loss_gives_silhouette_gradients():
    verts, faces = icosphere(4)
    verts.requires_grad_(True)
    camera = orbit()
    out = render_mesh(verts, faces, camera, 128, 128)
    out["mask"].sum().backward()
    assert torch.isfinite(verts.grad).all() and verts.grad.abs().sum() > 0
    # Growing the sphere by a factor (1 + eps) moves every vertex by eps * v, so the directional
    # derivative grad . v must match the analytic r * dArea/dr of the projected disk.
    slope = (verts.grad * verts.detach()).sum().item()
    eps = 1e-4
    expected = (disk_area(1 + eps, 3.0, camera, 128) - disk_area(1 - eps, 3.0, camera, 128)) / (2 * eps)
    assert abs(slope - expected) < 0.15 * expected
    # Only the outline moves the mask: vertices facing the camera get no gradient.
    facing = verts.detach() @ camera.c2w[0, :3, 2] > 0.5
    assert (verts.grad[facing] == 0).all()


def test_raster_back_faces_are_culled():
    camera = orbit(elevation=0.0, azimuth=0.0)                        # at +X, looking towards -X
    towards = torch.tensor([[0.0, -1.0, -1.0], [0.0, 1.0, -1.0], [0.0, 0.0, 1.0]])  # counter-clockwise seen from +X
    faces = torch.tensor([[0, 1, 2]])
    seen = render_mesh(towards, faces, camera, 32, 32)
    assert (seen["face_id"] == 0).any() and seen["mask"].sum() > 10
    assert (seen["normal"][0, :, 16, 16] - torch.tensor([1.0, 0.0, 0.0])).abs().max() < 1e-5
    hidden = render_mesh(towards, faces.flip(1), camera, 32, 32)      # same triangle, seen from behind
    assert (hidden["face_id"] == -1).all() and hidden["mask"].sum() == 0


def test_raster_batch_of_cameras_and_near_plane():
    verts, faces = icosphere(2)
    one = torch.ones(2)
    cameras = Camera.orbit(torch.tensor([0.0, 60.0]), torch.tensor([0.0, 90.0]), torch.tensor([3.0, 0.5]), 60 * one)
    out = render_mesh(verts, faces, cameras, 32, 32)
    assert out["mask"].shape == (2, 1, 32, 32) and out["face_id"].shape == (2, 32, 32)
    single = render_mesh(verts, faces, orbit(elevation=0.0, azimuth=0.0), 32, 32)
    assert torch.allclose(out["mask"][:1], single["mask"], atol=1e-6)
    # The second camera sits inside the sphere: it only sees back faces, which are culled.
    assert out["mask"][1].sum() == 0


def test_raster_occlusion_keeps_hidden_outlines_solid():
    big, big_faces = icosphere(3)
    small, small_faces = icosphere(3, radius=0.3)
    small = small + torch.tensor([1.5, 0.0, 0.0])                     # between the camera and the big sphere
    verts = torch.cat([big, small]).requires_grad_(True)
    faces = torch.cat([big_faces, small_faces + len(big)])
    camera = orbit(distance=4.0, elevation=0.0, azimuth=0.0)
    out = render_mesh(verts, faces, camera, 96, 96)
    assert abs(out["depth"][0, 0, 47:49, 47:49].mean().item() - 2.2) < 0.01  # the small sphere's front
    assert (out["face_id"][0, 47:49, 47:49] >= len(big_faces)).all()
    # The small sphere's outline lies inside the big sphere's disk: the mask stays exactly 1 there.
    radius = float(camera.focal(96)[0]) * math.tan(math.asin(1 / 4.0))
    rows, cols = torch.meshgrid(torch.arange(96) + 0.5, torch.arange(96) + 0.5, indexing="ij")
    inner = (rows - 48) ** 2 + (cols - 48) ** 2 < (radius - 3) ** 2
    assert (out["mask"][0, 0][inner] == 1).all()
    out["mask"].sum().backward()
    assert (verts.grad[len(big):] == 0).all() and verts.grad[:len(big)].abs().sum() > 0
