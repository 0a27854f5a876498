"""The paper's Figure 3: for query pixels, the phi-distance from the query's C-S feature (its embedding, with
the margin at that pixel) to every pixel, beside image, ground truth and prediction. Pillow + numpy only.
``csfrn visualize`` (checkpoint -> figure) is :mod:`csfrn.commands.visualize`."""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .. import ops
from ..data.transforms import denormalize
from .evaluate import colorize

# Anchors of a perceptually ordered dark-blue -> teal -> yellow map (viridis-like), interpolated linearly.
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
        model: a CSFRN model (``predict_maps`` gives "embeddings" and "margins").
        image: normalised [1, 3, H, W].
        points: [(y, x), ...] in image pixels.

    Returns:
        (logits [1, K, H, W], float32 [Q, H, W] numpy array of phi in [0, 1]); phi is 0 at the query's own
        feature and grows with distance, scaled by the query's margin (0 when the model has no margins).
    """
    feats = model.predict_maps(image)
    emb = feats["embeddings"]
    if emb is None:
        raise ValueError("distance maps need a model with CSFLM (its C-S features); this one has csflm=False")
    h, w = image.shape[-2:]
    eh, ew = emb.shape[-2:]
    margins = feats["margins"]
    maps = []
    for y, x in points:
        fy, fx = min(int(y * eh / h), eh - 1), min(int(x * ew / w), ew - 1)
        center = emb[:, :, fy, fx][:, None, :].contiguous()  # [1, 1, D]
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


# Query rings and their numbers: red, green, blue, as in the paper's Figure 3 (then again for more queries).
QUERY_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 64, 255)]
AUTO_TILE = 128  # without an explicit scale, tiles are upscaled (integer factor) to at least this width
HEADER, GAP = 20, 4  # pixels of column titles above the tiles; pixels between tiles


def _font(size):
    return ImageFont.load_default(size=size)


def query_colour(q):
    return QUERY_COLOURS[q % len(QUERY_COLOURS)]


def _ring(draw, cx, cy, q, box, radius):
    """Numbered ring of query ``q`` centred at (cx, cy) in canvas pixels; the number stays inside ``box``."""
    colour = query_colour(q)
    # a white halo keeps the ring visible on any background (phi is dark exactly at the query)
    draw.ellipse([cx - radius - 1, cy - radius - 1, cx + radius + 1, cy + radius + 1], outline=(255, 255, 255), width=4)
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=2)
    font = _font(12)
    text = str(q + 1)
    tw, th = draw.textbbox((0, 0), text, font=font)[2:]
    x0, y0, x1, y1 = box
    tx = cx + radius + 2 if cx + radius + 2 + tw <= x1 else cx - radius - 2 - tw
    ty = min(max(cy - radius - th, y0), y1 - th)
    draw.text((tx, ty), text, fill=colour, font=font, stroke_width=2, stroke_fill=(255, 255, 255))


def _colour_bar(draw, x0, y0, width, height=12):
    """Horizontal phi colour bar from 0 to 1 with ticks; returns the bottom y."""
    font = _font(12)
    draw.text((x0, y0), "phi: 0 = the query's own C-S feature, 1 = far from it", fill=(0, 0, 0), font=font)
    y0 += 16
    ramp = colormap(np.linspace(0, 1, width)[None, :].repeat(height, 0))
    draw._image.paste(Image.fromarray(ramp), (int(x0), int(y0)))
    draw.rectangle([x0 - 1, y0 - 1, x0 + width, y0 + height], outline=(0, 0, 0))
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x0 + v * (width - 1)
        draw.line([x, y0 + height, x, y0 + height + 3], fill=(0, 0, 0))
        draw.text((x, y0 + height + 4), f"{v:g}", fill=(0, 0, 0), font=font, anchor="mt")
    return y0 + height + 18


def _legend(draw, x0, y0, width, ids, classes, palette):
    """Swatch and name of each class id in ``ids``, wrapped into rows of ``width``; returns the bottom y
    (with ``draw`` None: only measures)."""
    font = _font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x, y = x0, y0
    for k in ids:
        name = classes[k] if classes is not None and k < len(classes) else f"class {k}"
        item = 16 + measure.textbbox((0, 0), name, font=font)[2] + 12
        if x > x0 and x + item > x0 + width:
            x, y = x0, y + 18
        if draw is not None:
            colour = tuple(int(c) for c in palette[k]) if k < len(palette) else (0, 0, 0)
            draw.rectangle([x, y + 1, x + 12, y + 13], fill=colour, outline=(0, 0, 0))
            draw.text((x + 16, y + 7), name, fill=(0, 0, 0), font=font, anchor="lm")
        x += item
    return y + 18 if ids else y0


def figure3(rows, path, palette, scale=None, classes=None, ignore_index=255):
    """Draw the grid and save it to ``path`` (its folder is created).

    Args:
        rows: list of dicts with "image" (uint8 [H, W, 3]), "label" and "pred" ([H, W] class ids),
            "points" [(y, x)] and "maps" (float [Q, H, W]).
        scale: integer upscaling of every tile (nearest); None: the least that makes tiles ``AUTO_TILE`` wide.
        classes: class names for the legend (default "class k").

    Queries are numbered rings in red, green and blue (the paper's Figure 3); under the grid, a colour bar for
    phi and a legend of the classes in the ground truth and prediction tiles.
    """
    h, w = rows[0]["image"].shape[:2]
    if scale is None:
        scale = max(1, -(-AUTO_TILE // w))
    queries = max([len(r["points"]) for r in rows] + [0])
    tiles_per_row = 3 + queries
    th, tw, gap, header = h * scale, w * scale, GAP, HEADER
    grid_w = tiles_per_row * (tw + gap) + gap
    width = max(grid_w, 2 * gap + 360)
    ids = sorted({int(k) for r in rows for t in (r["label"], r["pred"]) for k in np.unique(t) if k != ignore_index})
    grid_h = header + len(rows) * (th + gap) + gap
    footer = 50 + _legend(None, gap, 0, width - 2 * gap, ids, classes, palette) + gap
    canvas = Image.new("RGB", (width, grid_h + footer), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    titles = ["image", "ground truth", "prediction"] + [f"phi, query {q + 1}" for q in range(queries)]
    for c, title in enumerate(titles):
        x0 = gap + c * (tw + gap)
        size = 12
        while size > 7 and draw.textbbox((0, 0), title, font=_font(size))[2] > tw:
            size -= 1
        draw.text(
            (x0 + tw / 2, 4), title, fill=query_colour(c - 3) if c >= 3 else (0, 0, 0), font=_font(size), anchor="mt"
        )
    radius = max(4, min(3 * scale, 8))
    for r, row in enumerate(rows):
        tiles = [row["image"], colorize(row["label"], palette), colorize(row["pred"], palette)]
        tiles += [colormap(m) for m in row["maps"]]
        y0 = header + gap + r * (th + gap)
        for c, tile in enumerate(tiles):
            x0 = gap + c * (tw + gap)
            canvas.paste(Image.fromarray(tile).resize((tw, th), Image.NEAREST), (x0, y0))
            # rings: every query on the image, query q on its own phi map
            marks = list(enumerate(row["points"])) if c == 0 else ([(c - 3, row["points"][c - 3])] if c >= 3 else [])
            for q, (y, x) in marks:
                _ring(draw, x0 + (x + 0.5) * scale, y0 + (y + 0.5) * scale, q, (x0, y0, x0 + tw, y0 + th), radius)
    bar_w = min(width - 2 * gap, max(queries * (tw + gap) - gap, 300))
    y = _colour_bar(draw, gap + 2, grid_h, bar_w)
    _legend(draw, gap, y, width - 2 * gap, ids, classes, palette)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


@torch.no_grad()
def visualize_dataset(
    model, dataset, indices, path, palette, device, points=None, num_points=3, delta=10.0, scale=None, classes=None
):
    """Figure 3 for ``dataset`` items ``indices`` (normalised image, label): query points given (y, x) or
    picked per image with :func:`pick_points`. ``classes``: legend names (default: ``dataset.classes``).
    Returns the path written. An index outside the dataset or a point outside an image is a ValueError."""
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise ValueError(
            f"--indices {' '.join(map(str, bad))} out of range: the dataset has {len(dataset)} items "
            f"(0..{len(dataset) - 1})"
        )
    items = [dataset[i] for i in indices]
    if points is not None:
        for i, (image, _) in zip(indices, items):
            h, w = image.shape[-2:]
            outside = [f"{y},{x}" for y, x in points if not (0 <= y < h and 0 <= x < w)]
            if outside:
                raise ValueError(
                    f"--points {' '.join(outside)} outside item {i}, which is {h}x{w} "
                    f"(Y in 0..{h - 1}, X in 0..{w - 1})"
                )
    model.eval()
    rows = []
    for image, label in items:
        pts = points if points is not None else pick_points(label, num_points)
        logits, maps = distance_maps(model, image[None].to(device), pts, delta)
        rows.append(
            {
                "image": denormalize(image).permute(1, 2, 0).numpy(),
                "label": label.numpy(),
                "pred": logits.argmax(1)[0].cpu().numpy(),
                "points": pts,
                "maps": maps,
            }
        )
    return figure3(rows, path, palette, scale, classes if classes is not None else getattr(dataset, "classes", None))
