"""detectron2's DatasetMapper, with an image that cannot be decoded, or is not the size its dataset says,
reported as bad input naming it."""
import logging

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils

from gn_det.errors import InputError

logger = logging.getLogger(__name__)


class CheckedDatasetMapper(DatasetMapper):
    """``DatasetMapper`` whose failure to decode an image (a truncated or corrupt file), or an image whose
    decoded size is not the one its dataset gives, is an InputError naming the image file and the dataset(s) it
    belongs to, or, with ``skip_undecodable`` (``DATALOADER.SKIP_UNDECODABLE_IMAGES``), a warning naming them
    and counting the skips in this process; the mapper then returns None, and detectron2's ``MapDataset`` maps
    another image in its place.

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
        except utils.SizeMismatchError:
            # the decoded image is not the size the dataset's JSON gives it: boxes and masks would not fit it
            image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
            return self.bad_image(dataset_dict, f"is {image.shape[1]}x{image.shape[0]} px, but the dataset says "
                                                f"{dataset_dict.get('width')}x{dataset_dict.get('height')}")
        except (OSError, SyntaxError):
            # PIL raises OSError for a truncated or unrecognised file and SyntaxError for a broken PNG; so may
            # other reads of the mapper (e.g. a semantic segmentation file): only the image's own failure to
            # decode is bad input.
            try:
                utils.read_image(dataset_dict["file_name"], format=self.image_format)
            except (OSError, SyntaxError) as err:
                return self.bad_image(dataset_dict, f"cannot be decoded ({' '.join(str(err).split())})")
            raise

    def bad_image(self, dataset_dict, problem):
        """An InputError naming the image, its dataset and ``problem``; or, with ``skip_undecodable``, None
        (another image takes its place) and a warning counting the skips."""
        problem = (f"image {dataset_dict['file_name']} of dataset {', '.join(map(repr, self.dataset_names))} "
                   f"{problem}")
        if not self.skip_undecodable:
            raise InputError(f"{problem}; replace the file or remove the image from the dataset")
        self.skipped += 1
        logger.warning("%s: skipped (DATALOADER.SKIP_UNDECODABLE_IMAGES; %d skipped in this process)", problem,
                       self.skipped)
        return None
