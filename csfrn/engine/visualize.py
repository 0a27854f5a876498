"""The paper's Figure 3: for query pixels, the phi-distance from the query's C-S feature (its embedding, with
the margin at that pixel) to every pixel, beside image, ground truth and prediction. Pillow + numpy only."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .. import ops
from .evaluate import colorize

# Anchors of a perceptually ordered dark-blue -> teal -> yellow map (viridis-like), interpolated linearly.
HEADER = 14  # pixels of column titles above the tiles
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def colormap(values):
    """float array in [0, 1] -> uint8 [..., 3] colours."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(np.int64).clip(0, len(_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return ((1 - t) * _ANCHORS[lo] + t * _ANCHORS[lo + 1]).round().astype(np.uint8)


@torch.no_grad()
def distance_maps(model, image, points, delta=10.0):
    """phi maps of the query pixels.

    Args:
        model: a CSFRN model (``forward_features`` gives "embeddings" and "margins").
        image: normalised [1, 3, H, W].
        points: [(y, x), ...] in image pixels.

    Returns:
        (logits [1, K, H, W], float32 [Q, H, W] numpy array of phi in [0, 1]); phi is 0 at the query's own
        feature and grows with distance, scaled by the query's margin (0 when the model has no margins).
    """
    feats = model.forward_features(image)
    emb = feats["embeddings"]
    if emb is None:
        raise ValueError("distance maps need a model with CSFLM (its C-S features); this one has csflm=False")
    h, w = image.shape[-2:]
    eh, ew = emb.shape[-2:]
    margins = feats["margins"]
    maps = []
    for y, x in points:
        fy, fx = min(int(y * eh / h), eh - 1), min(int(x * ew / w), ew - 1)
        center = emb[:, :, fy, fx][:, None, :].contiguous()                     # [1, 1, D]
        margin = margins[:, 0, fy, fx][:, None] if margins is not None else emb.new_zeros(1, 1)
        phi = ops.center_distance(emb.contiguous(), center, margin.contiguous(), delta)
        maps.append(F.interpolate(phi, size=(h, w), mode="bilinear", align_corners=False)[0, 0])
    if not maps:
        return feats["logits"], np.zeros((0, h, w), dtype=np.float32)
    return feats["logits"], torch.stack(maps).float().cpu().numpy()


def pick_points(label, count=3, ignore_index=255):
    """One query pixel for each of the ``count`` largest classes in ``label``: the class pixel nearest to the
    class's centroid."""
    label = torch.as_tensor(label)
    classes, sizes = torch.unique(label[label != ignore_index], return_counts=True)
    points = []
    for k in classes[sizes.argsort(descending=True)][:count].tolist():
        ys, xs = torch.nonzero(label == k, as_tuple=True)
        cy, cx = ys.float().mean(), xs.float().mean()
        i = int(((ys - cy) ** 2 + (xs - cx) ** 2).argmin())
        points.append((int(ys[i]), int(xs[i])))
    return points


def _mark(img, points, radius=3):
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for y, x in points:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(255, 0, 0), width=2)
    return np.asarray(pil)


def figure3(rows, path, palette, scale=1):
    """Draw the grid and save it to ``path``.

    Args:
        rows: list of dicts with "image" (uint8 [H, W, 3]), "label" and "pred" ([H, W] class ids),
            "points" [(y, x)] and "maps" (float [Q, H, W]).
        scale: integer upscaling of every tile (nearest), for small images.
    """
    tiles_per_row = 3 + max([len(r["points"]) for r in rows] + [0])
    h, w = rows[0]["image"].shape[:2]
    th, tw, gap = h * scale, w * scale, 4
    canvas = Image.new("RGB", (tiles_per_row * (tw + gap) + gap, HEADER + len(rows) * (th + gap) + gap),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    titles = ["image", "ground truth", "prediction"] + [f"phi, query {q + 1}" for q in range(tiles_per_row - 3)]
    for c, title in enumerate(titles):
        draw.text((gap + c * (tw + gap), 2), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        tiles = [_mark(row["image"], row["points"]), colorize(row["label"], palette), colorize(row["pred"], palette)]
        tiles += [_mark(colormap(m), [p]) for m, p in zip(row["maps"], row["points"])]
        for c, tile in enumerate(tiles):
            img = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
            canvas.paste(img, (gap + c * (tw + gap), HEADER + gap + r * (th + gap)))
    canvas.save(path)
    return path


@torch.no_grad()
def visualize_dataset(model, dataset, indices, path, palette, device, points=None, num_points=3, delta=10.0,
                      scale=1):
    """Figure 3 for ``dataset`` items ``indices`` (normalised image, label): query points given (y, x) or
    picked per image with :func:`pick_points`. Returns the path written."""
    from ..data.transforms import denormalize

    model.eval()
    rows = []
    for i in indices:
        image, label = dataset[i]
        pts = points if points is not None else pick_points(label, num_points)
        logits, maps = distance_maps(model, image[None].to(device), pts, delta)
        rows.append({"image": denormalize(image).permute(1, 2, 0).numpy(), "label": label.numpy(),
                     "pred": logits.argmax(1)[0].cpu().numpy(), "points": pts, "maps": maps})
    return figure3(rows, path, palette, scale)
