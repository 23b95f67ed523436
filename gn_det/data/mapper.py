"""detectron2's DatasetMapper, with an image that cannot be decoded reported as bad input naming it."""
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils

from gn_det.errors import InputError


class CheckedDatasetMapper(DatasetMapper):
    """``DatasetMapper`` whose failure to decode an image (a truncated or corrupt file) is an InputError
    naming the image file and the dataset(s) it belongs to.

    ``dataset_names``: the names of the datasets this mapper maps (``DATASETS.TRAIN`` or one test set).
    """

    def __init__(self, cfg, is_train=True, *, dataset_names):
        super().__init__(cfg, is_train)
        self.dataset_names = tuple(dataset_names)

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
                names = ", ".join(map(repr, self.dataset_names))
                raise InputError(
                    f"image {file_name} of dataset {names} cannot be decoded ({' '.join(str(err).split())}); "
                    "replace the file or remove the image from the dataset"
                ) from None
            raise
