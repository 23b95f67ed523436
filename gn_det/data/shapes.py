"""A synthetic instance-segmentation dataset in COCO format: circles, rectangles and triangles.

gn-det's default training data: small and learnable enough that a Mask R-CNN trained from scratch on a CPU
reaches a meaningful AP within minutes, yet with what makes instance segmentation non-trivial: occlusion
(masks are the visible parts), random colours on textured backgrounds (colour does not give the class away)
and a 3x range of sizes.

Generation is deterministic: every image is drawn from its own ``numpy.random.default_rng`` seeded by
(seed, split, image index), so the same arguments write the same bytes. This module needs only numpy, PIL
and pycocotools; registering the dataset with detectron2 lives in :mod:`gn_det.data.register`.
"""
import fcntl
import json
import logging
import os
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

logger = logging.getLogger(__name__)

# Bump whenever the generator's output changes: the cache folder is named after it, so an old cache is
# never mistaken for the current dataset.
SHAPES_VERSION = 2
SHAPES_CLASSES = ("circle", "rectangle", "triangle")  # COCO category ids 1, 2, 3
SHAPES_SPLITS = ("train", "val")
DEFAULT_NUM_TRAIN = 500
DEFAULT_NUM_VAL = 100
DEFAULT_IMAGE_SIZE = 256

MAX_INSTANCES_PER_IMAGE = 5
# A shape's extent (circle diameter, rectangle long side, triangle circumcircle diameter) as a fraction
# of the image side.
SIZE_RANGE = (0.15, 0.45)
RECTANGLE_ASPECT_RANGE = (0.45, 1.0)  # short side / long side; 1.0 is a square
# An occluded shape must keep at least this fraction of its pixels, and this many pixels, visible. A new
# shape that would hide more of an earlier one is placed elsewhere (or left out), rather than dropping the
# earlier shape's annotation: a dropped instance would stay in the image as an unlabelled fragment that
# training would learn as background.
MIN_VISIBLE_FRACTION = 0.3
MIN_VISIBLE_PIXELS = 64
PLACEMENT_ATTEMPTS = 10
# Minimum RGB distance between a shape's colour and the mean colour it is painted over, so that every
# annotated shape can actually be seen.
MIN_CONTRAST = 80.0
COLOUR_ATTEMPTS = 20


def cache_root():
    """gn-det's cache folder: ``$GN_DET_CACHE``, or ``~/.cache/gn_det``."""
    return os.environ.get("GN_DET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gn_det")


def shapes_root():
    """The cache folder of the default dataset: ``$GN_DET_CACHE`` (or ``~/.cache/gn_det``)/shapes_v<N>."""
    return os.path.join(cache_root(), f"shapes_v{SHAPES_VERSION}")


def is_complete(root):
    """Whether ``root`` holds a finished dataset (the JSON files are written last)."""
    return all(os.path.isfile(os.path.join(root, f"{split}.json")) for split in SHAPES_SPLITS)


def ensure_shapes(root=None, **generate_kwargs):
    """Generate the dataset into ``root`` (default :func:`shapes_root`) unless it is already there.

    Safe against interruption and concurrency: the dataset is written to a sibling ``.partial-<pid>`` folder
    and renamed into place, so ``root`` exists only when complete, and an exclusive lock on a sibling
    ``.lock`` file makes concurrent callers (e.g. the processes of a distributed run) wait for one
    generation instead of racing. ``generate_kwargs`` go to :func:`generate_shapes` and only matter when
    the folder is generated. Returns the absolute ``root``.
    """
    root = os.path.abspath(root or shapes_root())
    if is_complete(root):
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    # The lock is a separate file because the folder it guards does not exist until the final rename.
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(root):  # another process generated it while this one waited for the lock
            return root
        if os.path.exists(root):
            raise FileExistsError(f"{root} exists but is not a complete shapes dataset; remove it to regenerate")
        # Holding the lock, any partial folder left here belongs to a generation that was killed.
        prefix = os.path.basename(root) + ".partial-"
        for stale in os.listdir(parent):
            if stale.startswith(prefix):
                shutil.rmtree(os.path.join(parent, stale))
        partial = os.path.join(parent, f"{prefix}{os.getpid()}")
        logger.info("Generating the synthetic shapes dataset into %s (first use) ...", root)
        start = time.perf_counter()
        try:
            generate_shapes(partial, **generate_kwargs)
            os.rename(partial, root)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        logger.info("Generated the shapes dataset in %.1f s", time.perf_counter() - start)
    return root


def generate_shapes(root, num_train=DEFAULT_NUM_TRAIN, num_val=DEFAULT_NUM_VAL, image_size=DEFAULT_IMAGE_SIZE,
                    seed=0):
    """Write ``root/{train,val}.json`` (COCO instances, RLE masks) and ``root/{train,val}/NNNNNN.png``.

    Images are ``image_size`` x ``image_size`` RGB with 1-5 instances each. Returns ``root``.
    """
    for split, num_images in zip(SHAPES_SPLITS, (num_train, num_val)):
        image_dir = os.path.join(root, split)
        os.makedirs(image_dir, exist_ok=True)
        images, annotations = [], []
        for index in range(num_images):
            # One generator per image: an image's content does not depend on how many came before it.
            rng = np.random.default_rng([seed, SHAPES_SPLITS.index(split), index])
            pixels, instances = render_image(rng, image_size)
            file_name = f"{index:06d}.png"
            Image.fromarray(pixels).save(os.path.join(image_dir, file_name), format="PNG")
            image_id = index + 1
            images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
            for category_id, visible_mask in instances:
                annotations.append(coco_annotation(len(annotations) + 1, image_id, category_id, visible_mask))
        dataset = {
            "info": {"description": f"gn-det synthetic shapes v{SHAPES_VERSION}, {split}, seed {seed}"},
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES_CLASSES)
            ],
        }
        # The JSON is written after the images: its presence marks the split as complete.
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump(dataset, f)
    return root


def coco_annotation(annotation_id, image_id, category_id, mask):
    """A COCO instance annotation with an RLE segmentation; bbox and area are those of ``mask``."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_util.toBbox(rle)]
    area = float(mask_util.area(rle))
    rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "segmentation": rle,
            "area": area, "bbox": bbox, "iscrowd": 0}


def render_image(rng, image_size):
    """Draw one image: ``(HxWx3 uint8 pixels, [(category_id, visible HxW bool mask), ...])``.

    Shapes are painted in order, each over the ones before; an instance's mask is its pixels minus those of
    every later shape.
    """
    canvas = background(rng, image_size)
    categories, full_areas, visible_masks = [], [], []
    for _ in range(rng.integers(1, MAX_INSTANCES_PER_IMAGE + 1)):
        category = int(rng.integers(len(SHAPES_CLASSES)))
        for _attempt in range(PLACEMENT_ATTEMPTS):
            mask = shape_mask(rng, category, image_size)
            if all(
                np.count_nonzero(visible & ~mask) >= max(MIN_VISIBLE_FRACTION * full_area, MIN_VISIBLE_PIXELS)
                for visible, full_area in zip(visible_masks, full_areas)
            ):
                break
        else:
            continue  # no placement keeps the earlier shapes visible enough: leave this shape out
        canvas[mask] = contrasting_colour(rng, canvas[mask])
        for visible in visible_masks:
            visible &= ~mask
        categories.append(category + 1)
        full_areas.append(np.count_nonzero(mask))
        visible_masks.append(mask)
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return pixels, list(zip(categories, visible_masks))


def background(rng, image_size):
    """A float HxWx3 background: a linear gradient between two random colours, in half the images overlaid
    with faint smooth colour blobs (30% amplitude), so the background varies without looking like shapes."""
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:image_size, 0:image_size] / (image_size - 1)
    t = x * np.cos(angle) + y * np.sin(angle)
    t = (t - t.min()) / (t.max() - t.min())
    start, end = rng.uniform(0, 255, size=(2, 3))
    gradient = start + t[..., None] * (end - start)
    if rng.random() < 0.5:
        return gradient
    # Random colours on a coarse grid, upsampled bicubically into soft blobs.
    cells = int(rng.integers(3, 9))
    grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    blobs = np.asarray(Image.fromarray(grid).resize((image_size, image_size), Image.BICUBIC), dtype=np.float64)
    return 0.7 * gradient + 0.3 * blobs


def shape_mask(rng, category, image_size):
    """The HxW bool mask of one randomly sized, rotated and placed shape, entirely inside the image."""
    extent = rng.uniform(*SIZE_RANGE) * image_size
    name = SHAPES_CLASSES[category]
    if name == "circle":
        vertices = None
        half = np.array([[-extent / 2, -extent / 2], [extent / 2, extent / 2]])
    elif name == "rectangle":
        width, height = extent, extent * rng.uniform(*RECTANGLE_ASPECT_RANGE)
        corners = np.array([[-width, -height], [width, -height], [width, height], [-width, height]]) / 2
        vertices = corners @ rotation(rng.uniform(0, np.pi)).T
    else:  # triangle: vertices on the circumcircle, about 120 degrees apart, so never degenerate
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3, size=3)
        radii = extent / 2 * rng.uniform(0.85, 1.0, size=3)
        vertices = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    points = half if vertices is None else vertices
    # Place the centre so that the whole shape lies inside [0, image_size - 1].
    low, high = -points.min(axis=0), image_size - 1 - points.max(axis=0)
    centre = rng.uniform(low, high)
    mask_image = Image.new("1", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask_image)
    if vertices is None:
        draw.ellipse([tuple(centre + half[0]), tuple(centre + half[1])], fill=1)
    else:
        draw.polygon([tuple(p) for p in centre + vertices], fill=1)
    return np.array(mask_image, dtype=bool)


def rotation(angle):
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def contrasting_colour(rng, covered_pixels):
    """A random RGB colour at least MIN_CONTRAST from the mean colour of the pixels it will cover."""
    covered_mean = covered_pixels.mean(axis=0)
    best, best_distance = None, -1.0
    for _ in range(COLOUR_ATTEMPTS):
        colour = rng.integers(0, 256, size=3).astype(np.float64)
        distance = np.linalg.norm(colour - covered_mean)
        if distance >= MIN_CONTRAST:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best
