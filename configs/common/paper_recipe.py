# The paper's COCO recipe on detectron2's configs/common (imported by the Python configs beside the YAML ones):
# COCO data evaluated for box and mask AP, SGD at LR 0.02 with weight decay 1e-4 but 0 on norm gamma/beta, and
# the 2x schedule: 180k iterations of 16 images, LR divided by 10 at 120k and 160k, 1000 warm-up iterations.
from detectron2 import model_zoo

from gn_det.lazy import no_weight_decay_on_norm

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
# explicit: inferred from predictions, a model that detects nothing yet would report no mask AP
dataloader.evaluator.tasks = ("bbox", "segm")
optimizer = no_weight_decay_on_norm(model_zoo.get_config("common/optim.py").SGD)
train = model_zoo.get_config("common/train.py").train
train.max_iter = 180000
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_2x
