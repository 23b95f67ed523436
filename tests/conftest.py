import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
GN_FPN = os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_R_50_FPN_2x_gn.yaml")
BNSTAR_FPN = os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_R_50_FPN_2x_bnstar.yaml")
# Small enough for a 2-core CPU: R-18, no pretrained weights, CPU.
TINY_OPTS = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18",
             "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]


@pytest.fixture(scope="session")
def d2():
    return pytest.importorskip("detectron2")
