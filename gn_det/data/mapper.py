"""detectron2's DatasetMapper, with an image that cannot be decoded reported as bad input naming it."""
import logging

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils

from gn_det.errors import InputError

logger = logging.getLogger(__name__)


class CheckedDatasetMapper(DatasetMapper):
    """``DatasetMapper`` whose failure to decode an image (a truncated or corrupt file) is an InputError
    naming the image file and the dataset(s) it belongs to, or, with ``skip_undecodable``, a warning naming
    them and counting the skips in this process; the mapper then returns None, and detectron2's ``MapDataset``
    maps another image in its place.

    ``dataset_names``: the names of the datasets this mapper maps (``DATASETS.TRAIN`` or one test set).
    """

    def __init__(self, cfg, is_train=True, *, dataset_names, skip_undecodable=False):
        super().__init__(cfg, is_train)
        self.dataset_names = tuple(dataset_names)
        self.skip_undecodable = skip_undecodable
        self.skipped = 0

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError):
            # PIL raises OSError for a truncated or unrecognised file and SyntaxError for a broken PNG; so may
            # other reads of the mapper (e.g. a semantic segmentation file): only the image's own failure to
            # decode is bad input.
            file_name = dataset_dict["file_name"]
            try:
                utils.read_image(file_name, format=self.image_format)
            except (OSError, SyntaxError) as err:
                problem = (f"image {file_name} of dataset {', '.join(map(repr, self.dataset_names))} cannot be "
                           f"decoded ({' '.join(str(err).split())})")
                if not self.skip_undecodable:
                    raise InputError(f"{problem}; replace the file or remove the image from the dataset") from None
                self.skipped += 1
                logger.warning("%s: skipped (DATALOADER.SKIP_UNDECODABLE_IMAGES; %d skipped in this process)",
                               problem, self.skipped)
                return None
            raise
