"""Tests for parts/export.py: atlas, bake, OBJ and GLB read back by small parsers."""

import io
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from parts.export import bake_texture, uv_atlas, write_glb, write_obj

# ------------------------------------------------------------------ fixtures


def ellipsoid():
    """Closed convex mesh: octahedron subdivided once (32 faces), on an ellipsoid.

    Scaled (1, 2, 3) and shifted so that the Z-up -> Y-up swap and the sign of
    -y are visible in the exported bounds. Faces wind counter-clockwise outward.
    """
    v = [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
    f = [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]]
    mid = {}

    def midpoint(a, b):
        key = (min(a, b), max(a, b))
        if key not in mid:
            mid[key] = len(v)
            v.append([(x + y) / 2 for x, y in zip(v[a], v[b])])
        return mid[key]

    faces = []
    for a, b, c in f:
        ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
        faces += [[a, ab, ca], [ab, b, bc], [ca, bc, c], [ab, bc, ca]]
    v = torch.tensor(v, dtype=torch.float32)
    v = v / v.norm(dim=1, keepdim=True) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([0.1, 0.2, 0.3])
    return v, torch.tensor(faces)


def colour_of(v):
    """Linear colour field spanning [0, 1] over the mesh's bounding box."""
    lo, hi = v.min(0).values, v.max(0).values
    return lambda p: (p - lo) / (hi - lo)


def y_up(a):
    return np.stack([a[:, 0], a[:, 2], -a[:, 1]], 1)


def sample(image, u, v_down):
    """Bilinear lookup like a GPU: image (H, W, 3) uint8, uv with origin top-left."""
    h, w = image.shape[:2]
    x, y = u * w - 0.5, v_down * h - 0.5  # texel centres sit at half-integers
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image.astype(np.float64) / 255

    def at(xi, yi):
        return img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]

    top = at(x0, y0) * (1 - fx) + at(x0 + 1, y0) * fx
    bottom = at(x0, y0 + 1) * (1 - fx) + at(x0 + 1, y0 + 1) * fx
    return top * (1 - fy) + bottom * fy


# ------------------------------------------------------------------- readers


def read_obj(folder, name="mesh"):
    """Parse our OBJ: v, vt, vn arrays and 0-based (F, 3) v / vt / vn indices."""
    out = {"v": [], "vt": [], "vn": [], "f": [], "mtllib": None}
    for line in (folder / f"{name}.obj").read_text().splitlines():
        key, *values = line.split()
        if key in ("v", "vt", "vn"):
            out[key].append([float(x) for x in values])
        elif key == "f":
            out["f"].append([[int(i) - 1 for i in corner.split("/")] for corner in values])
        elif key == "mtllib":
            out["mtllib"] = values[0]
    out = {k: np.array(x) if isinstance(x, list) else x for k, x in out.items()}
    out["f_v"], out["f_vt"], out["f_vn"] = (out["f"][..., i] for i in range(3))
    return out


def read_glb(path):
    """Parse a GLB, checking its framing; return (gltf json, {name: array}, PIL image)."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    chunks, offset = [], 12
    while offset < len(data):
        size, kind = struct.unpack_from("<I4s", data, offset)
        assert size % 4 == 0
        chunks.append((kind, data[offset + 8 : offset + 8 + size]))
        offset += 8 + size
    assert offset == len(data)
    assert [kind for kind, _ in chunks] == [b"JSON", b"BIN\0"]
    gltf, binary = json.loads(chunks[0][1]), chunks[1][1]
    assert gltf["buffers"][0]["byteLength"] <= len(binary)

    def view_bytes(i):
        view = gltf["bufferViews"][i]
        assert view["byteOffset"] % 4 == 0
        return binary[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]

    def accessor(i):
        acc = gltf["accessors"][i]
        dtype = {5126: np.float32, 5125: np.uint32}[acc["componentType"]]
        width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}[acc["type"]]
        array = np.frombuffer(view_bytes(acc["bufferView"]), dtype).reshape(-1, width)
        assert len(array) == acc["count"]
        return array

    prim = gltf["meshes"][0]["primitives"][0]
    arrays = {name: accessor(i) for name, i in prim["attributes"].items()}
    arrays["indices"] = accessor(prim["indices"])[:, 0]
    material = gltf["materials"][prim["material"]]
    texture = gltf["textures"][material["pbrMetallicRoughness"]["baseColorTexture"]["index"]]
    image = gltf["images"][texture["source"]]
    assert image["mimeType"] == "image/png"
    png = Image.open(io.BytesIO(view_bytes(image["bufferView"])))
    return gltf, arrays, png


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("faces_count", [1, 9, 32])
def test_export_uv_atlas_layout(faces_count):
    size = 64
    uv = uv_atlas(faces_count, size)
    assert uv.shape == (faces_count, 3, 2)
    assert uv.min() >= 0 and uv.max() <= 1
    px = uv.double() * size
    e1, e2 = px[:, 1] - px[:, 0], px[:, 2] - px[:, 0]
    assert ((e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]).abs() / 2 > 1).all()  # > 1 texel^2

    # Coverage: no texel centre lies in (or within a texel of) two triangles.
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.stack([xs, ys], -1).reshape(-1, 1, 2).double() + 0.5
    a, b, c = px[None, :, 0], px[None, :, 1], px[None, :, 2]

    def side(p, q, r):  # twice the signed area of (p, q, r), normalised by |q - p|
        d = q - p
        return (d[..., 0] * (r - p)[..., 1] - d[..., 1] * (r - p)[..., 0]) / d.norm(dim=-1)

    sign = side(a, b, c).sign()
    for grow in (0.0, 0.99):  # exact triangles, then triangles grown by ~1 texel
        inside = (side(a, b, centre) * sign > -grow) & (side(b, c, centre) * sign > -grow)
        inside &= side(c, a, centre) * sign > -grow
        assert inside.sum(1).max() <= 1
        assert (inside.sum(0) > 0).all()  # every triangle covers some texel


def test_export_uv_atlas_too_small_raises():
    with pytest.raises(ValueError):
        uv_atlas(1000, 64)


def test_export_bake_matches_color_fn():
    v, f = ellipsoid()
    f = f[:31]  # odd count: the last cell is half empty
    size = 128
    uv = uv_atlas(len(f), size)
    image = bake_texture(v, f, uv, colour_of(v), size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8

    # Colour is linear over each triangle and in its texture, so bilinear
    # sampling at the UV centroid must give the field at the 3D centroid.
    centroid_uv = uv.mean(1).numpy()
    got = sample(image, centroid_uv[:, 0], centroid_uv[:, 1])
    want = colour_of(v)(v[f].mean(1)).numpy()
    assert np.abs(got - want).max() < 2 / 255


def test_export_bake_no_bleeding_between_triangles():
    # A soup of separate triangles, each with its own flat colour: any bilinear
    # lookup inside a triangle, even at its corners, must see only that colour.
    faces_count, size = 9, 64  # 3 x 3 cells of 21.33 texels: cell edges off the texel grid
    base = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0.5]])
    v = torch.cat([base + torch.tensor([10.0 * i, 0, 0]) for i in range(faces_count)])
    f = torch.arange(3 * faces_count).reshape(-1, 3)
    palette = torch.rand(faces_count, 3, generator=torch.Generator().manual_seed(0))
    seen = []

    def color_fn(p):
        seen.append(p)
        return palette[(p[:, 0] / 10).round().long()]

    image = bake_texture(v, f, uv_atlas(faces_count, size), color_fn, size)
    # Gutter texels take colours from the triangle's border, never from
    # points extrapolated off the surface (where a radiance field means nothing).
    p = torch.cat(seen)
    x, y = p[:, 0] - 10 * (p[:, 0] / 10).round(), p[:, 1]
    assert (x >= -1e-5).all() and (y >= -1e-5).all() and (x + y <= 1 + 1e-5).all()
    assert torch.allclose(p[:, 2], y / 2, atol=1e-5)

    uv = uv_atlas(faces_count, size)
    weights = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    points = torch.einsum("kc,fcd->fkd", weights, uv).reshape(-1, 2).numpy()  # corners, edge midpoints, centroid
    got = sample(image, points[:, 0], points[:, 1]).reshape(faces_count, -1, 3)
    want = (palette * 255).round() / 255
    assert np.abs(got - want[:, None].numpy()).max() < 1e-6


def test_export_obj_roundtrip(tmp_path):
    v, f = ellipsoid()
    size = 128
    uv = uv_atlas(len(f), size)
    image = bake_texture(v, f, uv, colour_of(v), size)
    write_obj(tmp_path, v, f, uv, image)

    obj = read_obj(tmp_path)
    assert len(obj["v"]) == len(v) and len(obj["f"]) == len(f)
    assert len(obj["vt"]) == 3 * len(f) and len(obj["vn"]) == len(v)
    assert np.allclose(obj["v"], y_up(v.numpy()), atol=1e-5)
    assert (obj["f_v"] == f.numpy()).all()
    assert obj["f_vt"].max() < len(obj["vt"]) and (obj["f_vn"] == obj["f_v"]).all()

    # Outward in the file's own (Y-up) frame: vertex normals and face windings.
    p, centre = obj["v"], obj["v"].mean(0)
    assert ((obj["vn"] * (p - centre)).sum(1) > 0).all()
    tri = p[obj["f_v"]]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert ((face_n * (tri.mean(1) - centre)).sum(1) > 0).all()

    # Material points at the texture; OBJ's vt has its origin bottom-left.
    assert obj["mtllib"] == "mesh.mtl"
    assert "map_Kd texture.png" in (tmp_path / "mesh.mtl").read_text()
    png = np.array(Image.open(tmp_path / "texture.png"))
    assert png.shape == (size, size, 3)
    vt = obj["vt"][obj["f_vt"]].mean(1)
    got = sample(png, vt[:, 0], 1 - vt[:, 1])
    assert np.abs(got - colour_of(v)(v[f].mean(1)).numpy()).max() < 2 / 255


def test_export_glb_roundtrip(tmp_path):
    v, f = ellipsoid()
    size = 64
    uv = uv_atlas(len(f), size)
    image = bake_texture(v, f, uv, colour_of(v), size)
    path = tmp_path / "mesh.glb"
    write_glb(path, v, f, uv, image)

    gltf, arrays, png = read_glb(path)
    position, normal, texcoord, indices = (arrays[k] for k in ("POSITION", "NORMAL", "TEXCOORD_0", "indices"))
    assert len(indices) == 3 * len(f) and indices.max() < len(position)
    assert len(position) == len(normal) == len(texcoord) == 3 * len(f)

    acc = gltf["accessors"][gltf["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    assert acc["min"] == position.min(0).tolist() and acc["max"] == position.max(0).tolist()
    expected = y_up(v.numpy())[f.numpy().reshape(-1)]
    assert np.allclose(position, expected, atol=1e-6)
    assert np.allclose(acc["min"], [-0.9, -2.7, -2.2], atol=1e-6)  # x, z, -y bounds
    assert np.allclose(acc["max"], [1.1, 3.3, 1.8], atol=1e-6)

    centre = position.mean(0)
    assert np.allclose(np.linalg.norm(normal, axis=1), 1, atol=1e-5)
    assert ((normal * (position - centre)).sum(1) > 0).all()
    tri = position[indices].reshape(-1, 3, 3)
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert ((face_n * (tri.mean(1) - centre)).sum(1) > 0).all()

    pbr = gltf["materials"][0]["pbrMetallicRoughness"]
    assert (pbr["metallicFactor"], pbr["roughnessFactor"]) == (0, 1)
    assert png.size == (size, size)
    # glTF's UV origin is top-left: sample directly at the face's UV centroid.
    uv_centroid = texcoord[indices].reshape(-1, 3, 2).mean(1)
    got = sample(np.array(png.convert("RGB")), uv_centroid[:, 0], uv_centroid[:, 1])
    assert np.abs(got - colour_of(v)(v[f].mean(1)).numpy()).max() < 2 / 255
