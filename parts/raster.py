import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F

@dataclass
class Camera:
    """A batch of pinhole cameras. OpenGL convention: the camera looks down its -z axis, +y is up.
    World is Z-up; orbit cameras look at the origin."""
    c2w: torch.Tensor        # (B, 4, 4) camera-to-world
    fovy: torch.Tensor       # (B,) vertical field of view, degrees
    elevation: torch.Tensor  # (B,) degrees above the XY plane
    azimuth: torch.Tensor    # (B,) degrees; 0 looks from +X, counter-clockwise about +Z
    distance: torch.Tensor   # (B,) distance from the origin

    @staticmethod
    def orbit(elevation, azimuth, distance, fovy):
        el, az = torch.deg2rad(elevation.float()), torch.deg2rad(azimuth.float())
        eye = distance[:, None] * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)  # (B, 3)
        back = F.normalize(eye, dim=-1)                                  # camera +z: away from the target
        right = F.normalize(torch.cross(torch.tensor([0.0, 0.0, 1.0], device=eye.device).expand_as(back), back, dim=-1), dim=-1)
        up = torch.cross(back, right, dim=-1)
        c2w = torch.eye(4, device=eye.device).repeat(len(eye), 1, 1)
        c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, back, eye
        return Camera(c2w, fovy.float(), elevation.float(), azimuth.float(), distance.float())

    def focal(self, height):  # (B,) focal length in pixels
        return 0.5 * height / torch.tan(0.5 * torch.deg2rad(self.fovy))


# ----------------------------------------------------------------------------------------------
# Differentiable mesh rasteriser in plain PyTorch.
#
# Two passes:
#   1. Without gradient, enumerate (face, pixel) candidate pairs from each face's screen bounding
#      box and reduce them per pixel: a z-buffer (nearest covering face) and, for the soft
#      mask, the face owning the nearest silhouette edge (an edge between a visible face and a
#      culled one, i.e. where the outline runs).
#   2. With gradient, recompute only the winning faces of each pixel: perspective-correct
#      barycentrics give depth / position / normal, and a sigmoid of the signed distance to the
#      outline gives a soft mask whose edges move with the vertices.
# Pass 1 does the heavy lifting on many pairs but keeps no graph; pass 2 touches one face per
# pixel, so the autograd graph is only O(pixels).
# ----------------------------------------------------------------------------------------------

# (face, pixel) pairs per chunk of pass 1: ~300 bytes of temporaries each, so ~0.3 GB. For scale, one
# 512x512 view of a 200k-face sphere filling half the image makes ~0.4M pairs.
RASTER_CHUNK = 1 << 20


def _to_screen(vertices, camera, height, width, near):
    """World vertices (V,3) -> pixel coordinates (B,V,2) as (u = column, v = row) and depth along -z (B,V)."""
    c2w = camera.c2w.to(vertices)
    rot, eye = c2w[:, :3, :3], c2w[:, :3, 3]                                 # (B,3,3), (B,3)
    cam = (vertices[None] - eye[:, None]) @ rot                               # (B,V,3): R^T (x - eye), c2w is rigid
    depth = -cam[..., 2]
    # Vertices behind the near plane only belong to faces that are dropped; the clamp keeps them finite.
    inv_depth = 1.0 / depth.clamp_min(near)
    focal = camera.focal(height).to(vertices)[:, None]                        # (B,1)
    u = 0.5 * width + focal * cam[..., 0] * inv_depth
    v = 0.5 * height - focal * cam[..., 1] * inv_depth                        # image rows grow downwards
    return torch.stack([u, v], -1), depth


def _edge_neighbours(faces, num_vertices):
    """(F,3) -> (F,3): index of the face across edge k (the edge opposite vertex k), -1 on a boundary."""
    edges = torch.stack([faces[:, [1, 2]], faces[:, [2, 0]], faces[:, [0, 1]]], 1).reshape(-1, 2)  # (3F,2)
    key = edges.amin(1) * num_vertices + edges.amax(1)                       # same key for both sides of an edge
    order = key.argsort()
    same = key[order[1:]] == key[order[:-1]]                                 # consecutive equal keys = a shared edge
    first, second = order[:-1][same], order[1:][same]
    neighbour = torch.full_like(key, -1)
    neighbour[first], neighbour[second] = second // 3, first // 3
    return neighbour.view(-1, 3)


def _silhouette_edges(front, neighbour):
    """Edges of visible faces whose neighbour is not visible (or missing): where the mesh outline runs.
    front (B,F) bool, neighbour (F,3) -> (B,F,3) bool."""
    padded = F.pad(front, (0, 1))                                            # column F is "no face": never front
    other = padded[:, neighbour.where(neighbour >= 0, front.shape[1])]        # (B,F,3)
    return front[..., None] & ~other


def _barycentrics(tri, pix):
    """Screen-space barycentrics of pixel centres pix (N,2) in triangles tri (N,3,2) -> (N,3)."""
    start, end = tri.roll(-1, 1), tri.roll(-2, 1)                            # edge k runs opposite vertex k
    edge, to_pix = end - start, pix[:, None] - start                         # (N,3,2)
    cross = edge[..., 0] * to_pix[..., 1] - edge[..., 1] * to_pix[..., 0]    # twice the area of (start, end, pix)
    return cross / cross.sum(1, keepdim=True)                                # the three sub-areas add up to the triangle


def _silhouette_distance(tri, pix, silhouette):
    """Pixel distance from pix (N,2) to the nearest silhouette edge segment of tri (N,3,2) -> (N,); inf if none."""
    start, end = tri.roll(-1, 1), tri.roll(-2, 1)
    edge, to_pix = end - start, pix[:, None] - start
    t = ((to_pix * edge).sum(-1) / (edge * edge).sum(-1).clamp_min(1e-12)).clamp(0, 1)  # closest point on the segment
    dist = (to_pix - t[..., None] * edge).norm(dim=-1)                       # (N,3)
    return dist.masked_fill(~silhouette, math.inf).amin(1)


def _float_key(value, face):
    """Pack a non-negative float32 and a face index into one int64 that sorts by value first.
    Non-negative IEEE floats compare like their bit patterns, so one integer scatter-amin
    finds both the smallest value and the face it came from."""
    return (value.float().view(torch.int32).long() << 32) | face


def _face_of(buf):
    """Face index held in packed keys (B*H*W,), -1 where the buffer is empty."""
    return (buf & 0xFFFFFFFF).masked_fill(buf == torch.iinfo(torch.int64).max, -1)


def _pixel_boxes(tri, margin, height, width):
    """Pixels whose centres lie in each triangle's bounding box grown by margin px.
    tri (N,3,2) -> first row, first column, number of rows, number of columns, all (N,) long."""
    lo = (tri.amin(1) - margin).clamp(-2, max(height, width) + 2)            # (N,2) as (u, v)
    hi = (tri.amax(1) + margin).clamp(-2, max(height, width) + 2)
    first = (lo - 0.5).ceil().long().clamp_min(0)                            # centre j + 0.5 >= lo
    last = torch.minimum((hi - 0.5).floor().long(), torch.tensor([width - 1, height - 1], device=tri.device))
    count = (last - first + 1).clamp_min(0)
    return first[:, 1], first[:, 0], count[:, 1], count[:, 0]


def _pixel_pairs(row0, col0, nrows, ncols, chunk):
    """Enumerate the (box, pixel) pairs of pixel boxes (N,), about chunk pairs at a time, without a loop
    over boxes. Yields owner (P,) box index of each pair, row (P,), col (P,)."""
    count = nrows * ncols
    chunk_of = (count.cumsum(0) - count) // chunk                            # a box never straddles two chunks
    boxes = torch.arange(len(count), device=count.device)
    for ids in boxes.split(torch.bincount(chunk_of, minlength=1).tolist()):
        n = count[ids]
        owner = ids.repeat_interleave(n)                                     # box k repeated count[k] times
        offset = torch.arange(len(owner), device=count.device) - (n.cumsum(0) - n).repeat_interleave(n)
        yield owner, row0[owner] + offset // ncols[owner], col0[owner] + offset % ncols[owner]


def _rasterize_pairs(screen, depth, faces, front, silhouette, height, width, margin, chunk):
    """Pass 1 (no gradient). Returns two packed int64 buffers over the flattened (B*H*W,) pixels
    (int64 max where empty), see _float_key:
      zbuf: (depth, face) of the nearest face covering the pixel centre: the z-buffer;
      sbuf: (distance, face) of the nearest silhouette edge, if closer than margin."""
    batch, face = front.nonzero(as_tuple=True)                               # (N,) visible (camera, face) pairs
    tri, tri_depth = screen[batch[:, None], faces[face]], depth[batch[:, None], faces[face]]  # (N,3,2), (N,3)
    empty = torch.iinfo(torch.int64).max
    zbuf = torch.full((len(front) * height * width,), empty, device=screen.device)
    for owner, row, col in _pixel_pairs(*_pixel_boxes(tri, 0.0, height, width), chunk):
        pix = torch.stack([col, row], -1) + 0.5                              # (P,2) pixel centres as (u, v)
        bary = _barycentrics(tri.index_select(0, owner), pix)
        inside = (bary >= 0).all(1)
        owner, row, col, bary = owner[inside], row[inside], col[inside], bary[inside]
        # 1/depth is linear in screen space, so interpolate it with the screen barycentrics.
        pair_depth = 1.0 / (bary / tri_depth.index_select(0, owner)).sum(1)
        pixel = (batch[owner] * height + row) * width + col                  # flat index into (B,H,W)
        zbuf.scatter_reduce_(0, pixel, _float_key(pair_depth, face[owner]), "amin")

    # Only faces with a silhouette edge matter for the outline; they look a margin beyond their box.
    edgy = silhouette[batch, face].any(1).nonzero().squeeze(1)              # (M,) indices into the N faces
    sbuf = torch.full_like(zbuf, empty)
    for owner, row, col in _pixel_pairs(*_pixel_boxes(tri[edgy], margin, height, width), chunk):
        owner = edgy[owner]
        pix = torch.stack([col, row], -1) + 0.5
        dist = _silhouette_distance(tri.index_select(0, owner), pix, silhouette[batch[owner], face[owner]])
        near = dist < margin
        owner, row, col = owner[near], row[near], col[near]
        pixel = (batch[owner] * height + row) * width + col
        sbuf.scatter_reduce_(0, pixel, _float_key(dist[near], face[owner]), "amin")
    return zbuf, sbuf


def _scatter_image(values, pixel, shape):
    """values (P,C) at flat pixel indices (P,) -> (B,C,H,W) image, zero elsewhere (differentiable)."""
    batch, height, width = shape
    image = values.new_zeros(batch * height * width, values.shape[1]).index_copy(0, pixel, values)
    return image.view(batch, height, width, -1).permute(0, 3, 1, 2)


def _surface(vertices, faces, screen, depth, face_id, height, width, smooth_normals):
    """Pass 2 for the covered pixels: recompute the visible face's perspective-correct barycentrics with
    autograd and interpolate. Returns flat pixel indices (P,) and per-pixel attributes."""
    pixel = (face_id >= 0).nonzero().squeeze(1)                              # (P,)
    batch, fid = pixel // (height * width), face_id[pixel]
    corners = faces[fid]                                                     # (P,3)
    pix = torch.stack([pixel % width, pixel // width % height], -1) + 0.5
    bary = _barycentrics(screen[batch[:, None], corners], pix)               # (P,3) screen-space
    # Perspective-correct weights: screen barycentrics divided by vertex depth, renormalised
    # (the normaliser is 1/depth at the pixel, which is linear in screen space).
    weights = bary / depth[batch[:, None], corners]
    pix_depth = 1.0 / weights.sum(1, keepdim=True)                           # (P,1)
    weights = weights * pix_depth
    position = (weights[..., None] * vertices[corners]).sum(1)               # (P,3)
    v0, v1, v2 = vertices[faces].unbind(1)
    face_normal = torch.cross(v1 - v0, v2 - v0, dim=-1)                       # (F,3), length = twice the area
    if smooth_normals:  # area-weighted vertex normals, interpolated across the face
        vertex_normal = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), face_normal.repeat_interleave(3, 0))
        normal = (weights[..., None] * F.normalize(vertex_normal, dim=-1)[corners]).sum(1)
    else:
        normal = face_normal[fid]
    return pixel, dict(normal=F.normalize(normal, dim=-1), depth=pix_depth, position=position, bary=weights)


def _soft_mask(faces, screen, silhouette, face_id, edge_face, shape, sigma, margin):
    """Pass 2 for the outline: sigmoid(signed distance to the nearest silhouette edge / sigma), with autograd.
    Far from the outline the mask is the hard coverage. Returns (B*H*W,)."""
    batch, height, width = shape
    covered = face_id >= 0                                                   # (BHW,)
    # A covered pixel only blurs if an uncovered pixel is within the margin: silhouette edges hidden
    # behind other surfaces (or folded inside the outline) must not dent the inside of the mask.
    k = math.ceil(margin)
    hole = F.max_pool2d((~covered).float().view(batch, 1, height, width), 2 * k + 1, 1, k).view(-1) > 0
    pixel = ((edge_face >= 0) & (~covered | hole)).nonzero().squeeze(1)      # (S,)
    b, fid = pixel // (height * width), edge_face[pixel]
    pix = torch.stack([pixel % width, pixel // width % height], -1) + 0.5
    dist = _silhouette_distance(screen[b[:, None], faces[fid]], pix, silhouette[b, fid])
    signed = torch.where(covered[pixel], dist, -dist)                        # > 0 inside the outline
    return covered.to(screen.dtype).index_put((pixel,), torch.sigmoid(signed / sigma))


def render_mesh(vertices, faces, camera, height, width, *, smooth_normals=False, sigma=0.5, near=1e-2, chunk=RASTER_CHUNK):
    """Rasterise a triangle mesh seen by a batch of cameras, differentiably w.r.t. the vertices.

    vertices (V,3) float world positions, faces (F,3) long, counter-clockwise seen from outside.
    Returns a dict of images; all but the mask are zero where no face is visible:
      mask      (B,1,H,W) soft coverage in [0,1]: within 4*sigma px of the outline it is
                sigmoid(signed distance to the nearest silhouette edge / sigma), in the spirit of
                SoftRas (Liu et al. 2019, "Soft Rasterizer"), so the outline moves with the vertices
                and gets gradients; elsewhere it is the hard 0/1 coverage.
      normal    (B,3,H,W) world-space unit normal: the face normal, or the interpolated vertex normal
                if smooth_normals.
      depth     (B,1,H,W) distance along the camera's -z axis.
      position  (B,3,H,W) world-space surface point.
      bary      (B,3,H,W) perspective-correct barycentrics of the visible face (for texturing).
      face_id   (B,H,W) long index of the visible face, -1 where none.
    sigma is the outline's softness in pixels. Back faces and faces reaching the near plane
    (depth <= near) are dropped. chunk bounds the (face, pixel) pairs held at once (~300 bytes
    each): the default keeps 512x512 with ~200k faces well under 1 GB.
    """
    shape = (len(camera.c2w), height, width)
    margin = 4 * sigma                                                       # sigmoid(4) ~ 0.98: beyond, hard 0/1
    screen, depth = _to_screen(vertices, camera, height, width, near)        # (B,V,2), (B,V)

    with torch.no_grad():  # pass 1: visibility
        e1, e2 = (screen[:, faces[:, 1:]] - screen[:, faces[:, :1]]).unbind(2)  # (B,F,2) each
        # Rows grow downwards, so faces that are counter-clockwise on the camera's (x, y-up) plane
        # have negative signed area in (u, v). Zero area is edge-on or degenerate: nothing to draw.
        front = (e1[..., 0] * e2[..., 1] - e1[..., 1] * e2[..., 0] < 0) & (depth[:, faces] > near).all(-1)
        silhouette = _silhouette_edges(front, _edge_neighbours(faces, len(vertices)))  # (B,F,3)
        zbuf, sbuf = _rasterize_pairs(screen, depth, faces, front, silhouette, height, width, margin, chunk)
        face_id, edge_face = _face_of(zbuf), _face_of(sbuf)                  # (BHW,) each

    pixel, surface = _surface(vertices, faces, screen, depth, face_id, height, width, smooth_normals)
    mask = _soft_mask(faces, screen, silhouette, face_id, edge_face, shape, sigma, margin)
    out = {name: _scatter_image(value, pixel, shape) for name, value in surface.items()}
    return dict(out, mask=mask.view(shape[0], 1, height, width), face_id=face_id.view(shape))
