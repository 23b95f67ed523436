"""COCO box / mask AP of any model callable like a detectron2 model (an exported file included), on a dataset
of its config, as detectron2's ``tools/deploy/export_model.py --run-eval``: the test set is read and evaluated
as ``tools/train_net.py --eval-only`` does (YAML: ``GNTrainer``'s test loader, whose checked mapper names an
image that cannot be decoded, and its evaluator, with explicit tasks; Python config: ``dataloader.test`` and
``dataloader.evaluator``), with detectron2's ``inference_on_dataset``."""
import os

from detectron2.config import instantiate
from detectron2.evaluation import inference_on_dataset

from gn_det.config import get_gn_cfg, load_lazy_config
from gn_det.data import register_datasets
from gn_det.errors import InputError

# export_model.py has no --dataset flag: a config registers the datasets it names
YAML_REGISTER_HINT = "DATASETS.REGISTER ['NAME=JSON,IMAGE_DIR']"
LAZY_REGISTER_HINT = "gn_det.data.register_datasets('NAME=JSON,IMAGE_DIR') in the config"


def test_dataset(config_file, opts=(), dataset=None, evaluating=False):
    """``(config, dataset name)`` of the config's test set (``DATASETS.TEST[0]`` /
    ``dataloader.test.dataset.names``, or ``dataset``), checked as a run checks the datasets it reads
    (:func:`gn_det.engine.check_dataset`); with ``evaluating``, a Python config must also have
    ``dataloader.evaluator``, and a model that predicts masks needs the test set's segmentations. Nothing is read
    but the config, nothing is written."""
    from gn_det.engine import check_dataset

    if config_file.endswith(".py"):
        from gn_det.engine.lazy_train import dataset_names, predicts_masks

        cfg = load_lazy_config(config_file, opts)
        needed = ("test", "evaluator") if evaluating else ("test",)
        for section in needed:
            if cfg.get("dataloader", {}).get(section) is None:
                raise InputError(f"{config_file}: no dataloader.{section}, which export_model.py reads the test "
                                 "set with (see detectron2's configs/common/data/coco.py)")
        if dataset:
            cfg.dataloader.test.dataset.names = dataset
        names = dataset_names(cfg, "test")
        if not names:
            raise InputError(f"{config_file}: dataloader.test.dataset.names is empty; name a test dataset")
        for key, name in names:
            check_dataset(name, key, config_file, register_hint=LAZY_REGISTER_HINT,
                          masks=evaluating and predicts_masks(cfg))
        return cfg, names[0][1]
    cfg = get_gn_cfg(config_file, list(opts))
    register_datasets(cfg.DATASETS.REGISTER)
    name = dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if name is None:
        raise InputError(f"{config_file}: DATASETS.TEST is empty; name a test dataset")
    check_dataset(name, "dataset" if dataset else "DATASETS.TEST", config_file, register_hint=YAML_REGISTER_HINT,
                  masks=evaluating and cfg.MODEL.MASK_ON)
    return cfg, name


def test_loader_and_evaluator(config_file, opts, output_dir, dataset=None):
    """``(data loader, evaluator)`` of the config's checked test set (:func:`test_dataset`), one image per
    batch, resized as the config's test-time resize; the evaluator's files go to ``output_dir/inference``."""
    cfg, name = test_dataset(config_file, opts, dataset, evaluating=True)
    inference_dir = os.path.join(output_dir, "inference")
    if config_file.endswith(".py"):
        cfg.dataloader.evaluator.output_dir = inference_dir
        return instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    from gn_det.engine import GNTrainer

    cfg.defrost()
    # read in this process: an error raised in a loader worker comes back with the worker's traceback in its
    # message, where a bad image is one line
    cfg.DATALOADER.NUM_WORKERS = 0
    return GNTrainer.build_test_loader(cfg, name), GNTrainer.build_evaluator(cfg, name, inference_dir)


def evaluate(model, config_file, opts, output_dir, dataset=None):
    """COCO AP (the evaluator's results, e.g. ``{"bbox": {...}, "segm": {...}}``) of ``model`` on the config's
    test set (``dataset`` when given); the evaluator's files go to ``output_dir/inference``."""
    loader, evaluator = test_loader_and_evaluator(config_file, opts, output_dir, dataset)
    return inference_on_dataset(model, loader, evaluator)
