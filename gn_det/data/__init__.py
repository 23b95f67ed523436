"""Datasets: the synthetic shapes dataset (gn-det's default training data) and checked COCO registration.

Importing this package registers ``shapes_train`` and ``shapes_val`` without generating anything: the
dataset is generated into :func:`shapes_root` the first time detectron2 asks for a split.
"""
from .mapper import CheckedDatasetMapper
from .register import (
    check_coco_dataset,
    check_coco_dataset_once,
    parse_dataset_spec,
    register_coco_dataset,
    register_datasets,
    register_shapes,
)
from .shapes import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    SHAPES_CLASSES,
    SHAPES_SPLITS,
    SHAPES_VERSION,
    cache_root,
    ensure_shapes,
    generate_shapes,
    shapes_root,
)

register_shapes()
