# Paper Table 6: R50-FPN 2x, GN in backbone, FPN, box and mask head. Paper: 40.3 box AP / 35.7 mask AP.
# LazyConfig twin of mask_rcnn_R_50_FPN_2x_gn.yaml (same modules and parameter names, tests/test_lazy.py):
# detectron2's configs/common model, data, optimizer and schedule with GN (G=32) at every norm site but the
# RPN, the 4conv1fc box head, stride in the 3x3 conv, fine-tuned from Detectron's GN ImageNet model with no
# weight decay on GN's gamma/beta.
from detectron2 import model_zoo

import gn_det
from gn_det.lazy import no_weight_decay_on_norm, set_norm, use_4conv1fc_box_head

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
# explicit: inferred from predictions, a model that detects nothing yet would report no mask AP
dataloader.evaluator.tasks = ("bbox", "segm")
model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
optimizer = model_zoo.get_config("common/optim.py").SGD
train = model_zoo.get_config("common/train.py").train
# 2x: 180k iterations of 16 images, LR 0.02 divided by 10 at 120k and 160k, 1000 warm-up iterations
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_2x
train.max_iter = 180000

model.backbone.bottom_up.freeze_at = 2
model.backbone.bottom_up.stages.stride_in_1x1 = False  # as Detectron's GN ImageNet models
use_4conv1fc_box_head(model)
set_norm(model, gn_det.GN(num_groups=32))
no_weight_decay_on_norm(optimizer)
train.init_checkpoint = "catalog://ImageNetPretrained/FAIR/R-50-GN"
