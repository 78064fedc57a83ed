"""Export a textured triangle mesh as OBJ (+MTL +PNG) or as a binary glTF (.glb).

Pipeline:  uv = uv_atlas(F, S)  ->  image = bake_texture(..., uv, color_fn, S)
           ->  write_obj(folder, ...)  and/or  write_glb(path, ...)

Conventions
- Input mesh: world is Z-up; faces wind counter-clockwise seen from outside,
  so cross(v1 - v0, v2 - v0) points out of the surface.
- `uv` uses the *image* convention: (0, 0) is the top-left texel corner and v
  grows downward. glTF uses exactly this; OBJ puts (0, 0) at the bottom-left,
  so write_obj stores v' = 1 - v.
- Both files are Y-up, the convention of glTF, three.js and Blender's default
  OBJ import (forward -Z, up Y). Positions and normals go through
  (x, y, z) -> (x, z, -y): a rotation (determinant +1), so windings and
  outward normals survive, and the importer's Y-up -> Z-up conversion
  reproduces our original coordinates.
- Colours are stored as-is: the colour field is trained against sRGB images,
  and both formats read colour textures as sRGB.
"""

import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# --------------------------------------------------------------------- atlas
#
# Faces 2k and 2k+1 share square cell k of an n x n grid
# (n = ceil(sqrt(ceil(F / 2)))), at row k // n and column k % n. A cell is
# `cell = S / n` texels wide (S = texture size; not necessarily an integer).
# In cell-local texel coordinates (s right, t down), with margin m and leg
# length L = cell - 4m:
#
#     (0,0) +-------------------+
#           |  a-----b       c' |    face 2k   (lower): a=(m, m)   b=(m+L, m)   c=(m, m+L)
#           |  |   /       / |  |    face 2k+1 (upper): a', b', c' = the lower corners
#           |  |  /       /  |  |                       turned 180 degrees about the
#           |  | /       /   |  |                       cell centre: p -> (cell, cell) - p
#           |  c       b'----a' |
#           +-------------------+ (cell, cell)
#
# Why m = 1 texel suffices: a bilinear lookup at a point reads the texels whose
# centres lie less than one texel away along each axis. Every triangle is m
# texels from its cell's border, and the two hypotenuses (s + t = cell - 2m and
# s + t = cell + 2m) are 2m apart in s + t, so all texels read around a point
# of a triangle lie in its cell and on its side of the diagonal s + t = cell,
# i.e. texels that bake_texture fills from that same triangle. (Mipmaps would
# average wider footprints; the GLB sampler turns them off.)

MARGIN = 1.0  # texels; see above
_CHUNK = 65536  # surface points per color_fn call (bounds memory)


def _grid(faces_count, texture_size):
    """Cells per side and texels per cell of the pair-in-cell atlas."""
    n = max(1, math.ceil(math.sqrt(math.ceil(faces_count / 2))))
    cell = texture_size / n
    if cell - 4 * MARGIN < 1:  # legs shorter than one texel: the texture is too small
        need = math.ceil(n * (4 * MARGIN + 1))
        raise ValueError(f"{faces_count} faces need a texture of at least {need} texels")
    return n, cell


def uv_atlas(faces_count, texture_size):
    """Per-corner UVs (F, 3, 2) in [0, 1], image convention (origin top-left).

    Layout: see the diagram above. Corner i of face f gets uv[f, i].
    """
    n, cell = _grid(faces_count, texture_size)
    m, leg = MARGIN, cell - 4 * MARGIN
    lower = torch.tensor([[m, m], [m + leg, m], [m, m + leg]], dtype=torch.float64)
    upper = cell - lower
    f = torch.arange(faces_count)
    k = f // 2
    origin = torch.stack([k % n, k // n], -1).double() * cell  # top-left of each cell
    local = torch.where((f % 2 == 0)[:, None, None], lower, upper)
    return ((origin[:, None, :] + local) / texture_size).float()


# ---------------------------------------------------------------------- bake


def _barycentric(p, tri):
    """Barycentric weights (N, 3) of 2D points p (N, 2) in triangles tri (N, 3, 2)."""
    a, b, c = tri.unbind(1)
    e1, e2, d = b - a, c - a, p - a
    det = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
    wb = (d[:, 0] * e2[:, 1] - e2[:, 0] * d[:, 1]) / det
    wc = (e1[:, 0] * d[:, 1] - d[:, 0] * e1[:, 1]) / det
    return torch.stack([1 - wb - wc, wb, wc], -1)


@torch.no_grad()
def bake_texture(vertices, faces, uv, color_fn, texture_size=1024):
    """Bake color_fn over the surface into an (S, S, 3) uint8 texture.

    `uv` must be uv_atlas(len(faces), texture_size): each texel centre finds its
    face arithmetically (cell, then which side of the cell diagonal), then its
    barycentrics from that face's UVs. Gutter texels (outside the triangle but in
    its half-cell) get clamped barycentrics, i.e. a colour from the triangle's
    border, so filtering near edges never reads black. Texels of unused cells
    stay black. color_fn maps points (N, 3) to colours (N, 3) in [0, 1].
    """
    device, faces_count = vertices.device, faces.shape[0]
    n, cell = _grid(faces_count, texture_size)
    ys, xs = torch.meshgrid(
        torch.arange(texture_size, device=device), torch.arange(texture_size, device=device), indexing="ij"
    )
    centre = torch.stack([xs, ys], -1).reshape(-1, 2).double() + 0.5  # texel centres, in texels
    col_row = (centre / cell).floor().clamp(max=n - 1)
    upper = (centre - col_row * cell).sum(-1) > cell
    face = 2 * (col_row[:, 1] * n + col_row[:, 0]).long() + upper
    texels = (face < faces_count).nonzero()[:, 0]

    faces, uv = faces.to(device), uv.to(device).double()
    image = torch.zeros(texture_size**2, 3, dtype=torch.uint8)
    for idx in texels.split(_CHUNK):
        f = face[idx]
        w = _barycentric(centre[idx] / texture_size, uv[f]).clamp(min=0)
        w = w / w.sum(-1, keepdim=True)
        corners = vertices[faces[f]]  # (N, 3, 3)
        points = (w.to(corners.dtype)[..., None] * corners).sum(1)
        colors = color_fn(points).float().clamp(0, 1)
        image[idx.cpu()] = (colors * 255).round().to(torch.uint8).cpu()
    return image.reshape(texture_size, texture_size, 3).numpy()


# ------------------------------------------------------------ shared helpers


def _np(x, dtype):
    """Tensor or array -> numpy array of dtype."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _y_up(a):
    """Z-up -> Y-up: (x, y, z) -> (x, z, -y)."""
    return np.stack([a[:, 0], a[:, 2], -a[:, 1]], 1)


def _vertex_normals(v, f):
    """Area-weighted unit vertex normals, outward for counter-clockwise faces."""
    face_n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # length = 2 * area
    n = np.zeros_like(v)
    for i in range(3):
        np.add.at(n, f[:, i], face_n)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    n = n / np.maximum(length, 1e-20)
    n[length[:, 0] < 1e-20] = (0, 0, 1)  # isolated or degenerate vertex: any unit vector
    return n


def _png_bytes(texture_image):
    image = _np(texture_image, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------- OBJ

_MTL = """\
# Colour comes only from the texture: white diffuse, no specular,
# not metallic (Ka / Pm), fully rough (Ns / Pr).
newmtl material0
Ka 0 0 0
Kd 1 1 1
Ks 0 0 0
Ns 0
Pm 0
Pr 1
d 1
illum 1
map_Kd texture.png
"""


def write_obj(path_prefix_dir, vertices, faces, uv, texture_image, name="mesh"):
    """Write {name}.obj, {name}.mtl and texture.png into folder path_prefix_dir.

    Y-up (see module docstring), 1-based indices, one 'vt' per face corner
    (the corner-th 'vt' of face i is number 3i + corner + 1), one 'vn' per vertex.
    """
    folder = Path(path_prefix_dir)
    folder.mkdir(parents=True, exist_ok=True)
    v, f, uv = _np(vertices, np.float64), _np(faces, np.int64), _np(uv, np.float64)
    vt = uv.reshape(-1, 2) * (1, -1) + (0, 1)  # OBJ's v axis points up
    vt_index = np.arange(3 * len(f)).reshape(-1, 3) + 1

    lines = [f"mtllib {name}.mtl", f"o {name}"]
    lines += [f"v {x:.7g} {y:.7g} {z:.7g}" for x, y, z in _y_up(v)]
    lines += [f"vt {s:.7f} {t:.7f}" for s, t in vt]
    lines += [f"vn {x:.6f} {y:.6f} {z:.6f}" for x, y, z in _y_up(_vertex_normals(v, f))]
    lines.append("usemtl material0")
    lines += ["f " + " ".join(f"{a}/{t}/{a}" for a, t in zip(face + 1, tex)) for face, tex in zip(f, vt_index)]

    (folder / f"{name}.obj").write_text("\n".join(lines) + "\n")
    (folder / f"{name}.mtl").write_text(_MTL)
    (folder / "texture.png").write_bytes(_png_bytes(texture_image))


# ----------------------------------------------------------------------- GLB
# glTF 2.0 constants
_FLOAT, _UINT32 = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _CLAMP_TO_EDGE = 9729, 33071


def _pad4(data, fill):
    """glTF aligns every chunk and bufferView to 4 bytes."""
    return data + fill * (-len(data) % 4)


def write_glb(path, vertices, faces, uv, texture_image):
    """Write a binary glTF 2.0 file: one mesh, one textured PBR material, Y-up."""
    v, f, uv = _np(vertices, np.float64), _np(faces, np.int64), _np(uv, np.float32)
    # A glTF vertex has exactly one UV, and every face corner has its own UV,
    # so each corner becomes its own vertex (3 per face).
    corners = f.reshape(-1)
    position = _y_up(v)[corners].astype(np.float32)
    normal = _y_up(_vertex_normals(v, f))[corners].astype(np.float32)
    texcoord = uv.reshape(-1, 2)  # glTF's UV origin is top-left, like ours
    index = np.arange(len(corners), dtype=np.uint32)

    blobs = [position.tobytes(), normal.tobytes(), texcoord.tobytes(), index.tobytes(), _png_bytes(texture_image)]
    targets = [_ARRAY_BUFFER] * 3 + [_ELEMENT_ARRAY_BUFFER, None]  # the image is no vertex data
    binary, views = b"", []
    for blob, target in zip(blobs, targets):
        view = {"buffer": 0, "byteOffset": len(binary), "byteLength": len(blob)}
        if target is not None:
            view["target"] = target
        views.append(view)
        binary += _pad4(blob, b"\0")

    count = len(corners)
    gltf = {
        "asset": {"version": "2.0", "generator": "prolific.py"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [
            {
                "primitives": [
                    {
                        "attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2},
                        "indices": 3,
                        "material": 0,
                        "mode": 4,  # triangles
                    }
                ]
            }
        ],
        "accessors": [
            # the spec requires min/max on POSITION (used for bounding boxes)
            {
                "bufferView": 0, "componentType": _FLOAT, "count": count, "type": "VEC3",
                "min": position.min(0).tolist(), "max": position.max(0).tolist(),
            },
            {"bufferView": 1, "componentType": _FLOAT, "count": count, "type": "VEC3"},
            {"bufferView": 2, "componentType": _FLOAT, "count": count, "type": "VEC2"},
            {"bufferView": 3, "componentType": _UINT32, "count": count, "type": "SCALAR"},
        ],
        "bufferViews": views,
        "buffers": [{"byteLength": len(binary)}],
        "materials": [
            {
                "pbrMetallicRoughness": {
                    "baseColorTexture": {"index": 0},
                    "metallicFactor": 0.0,
                    "roughnessFactor": 1.0,
                }
            }
        ],
        "textures": [{"sampler": 0, "source": 0}],
        "images": [{"bufferView": 4, "mimeType": "image/png"}],
        # plain bilinear, no mipmaps: mipmaps would blend neighbouring atlas cells
        "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR, "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}],
    }
    json_chunk = _pad4(json.dumps(gltf, separators=(",", ":")).encode(), b" ")
    body = struct.pack("<I4s", len(json_chunk), b"JSON") + json_chunk
    body += struct.pack("<I4s", len(binary), b"BIN\0") + binary
    Path(path).write_bytes(struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body)
