"""COCO box / mask AP of any model callable like a detectron2 model (an exported file included), on a dataset
of its config, with detectron2's own evaluation (``build_detection_test_loader``, ``COCOEvaluator``,
``inference_on_dataset``), as detectron2's ``tools/deploy/export_model.py --run-eval``."""
import os

from detectron2.config import instantiate
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset

from gn_det.config import get_gn_cfg, load_lazy_config
from gn_det.data import register_datasets
from gn_det.errors import InputError


def test_loader_and_dataset(config_file, opts=(), dataset=None):
    """``(data loader, dataset name)`` of the config's test set (``DATASETS.TEST[0]``, or ``dataset``), one image
    per batch, resized as the config's test-time resize; checked before anything runs."""
    from detectron2.data import DatasetCatalog

    if config_file.endswith(".py"):
        cfg = load_lazy_config(config_file, opts)
        loader_cfg = cfg.get("dataloader", {}).get("test")
        if loader_cfg is None:
            raise InputError(f"{config_file}: --run-eval needs dataloader.test in a Python config")
        if dataset:
            loader_cfg.dataset.names = dataset
        name = loader_cfg.dataset.names
        name = name if isinstance(name, str) else name[0]
        if name not in DatasetCatalog.list():
            raise InputError(f"{config_file}: dataset {name!r} is not registered")
        return instantiate(loader_cfg), name
    cfg = get_gn_cfg(config_file, list(opts))
    register_datasets(cfg.DATASETS.REGISTER)
    name = dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if name is None:
        raise InputError(f"{config_file}: DATASETS.TEST is empty; --run-eval needs a test dataset")
    if name not in DatasetCatalog.list():
        raise InputError(f"DATASETS.TEST: dataset {name!r} is not registered")
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 0
    return build_detection_test_loader(cfg, name), name


def evaluate(model, config_file, opts=(), output_dir=None, dataset=None):
    """COCO AP (detectron2's ``COCOEvaluator`` results: ``{"bbox": {...}, "segm": {...}}``) of ``model`` on the
    config's test set; the evaluator's files go to ``output_dir/inference`` when given."""
    loader, name = test_loader_and_dataset(config_file, opts, dataset)
    evaluator = COCOEvaluator(name, output_dir=os.path.join(output_dir, "inference") if output_dir else None)
    return inference_on_dataset(model, loader, evaluator)
