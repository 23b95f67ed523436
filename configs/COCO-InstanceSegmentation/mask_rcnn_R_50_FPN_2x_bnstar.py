# Paper Table 5 (BN* backbone, 4conv1fc head, no head norm) and Table 6 R50-FPN 2x BN*. Paper: 38.6 box AP / 34.2 (T5), 34.5 (T6) mask AP.
# LazyConfig twin of mask_rcnn_R_50_FPN_2x_bnstar.yaml: detectron2's configs/common model (FrozenBN backbone,
# stride in the 1x1 conv, no norm in FPN and heads) with the same 4conv1fc box head as the GN models, so the
# two differ only in normalization. Fine-tuned from the MSRA BN ImageNet model.
from detectron2 import model_zoo

from gn_det.lazy import no_weight_decay_on_norm, use_4conv1fc_box_head

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
use_4conv1fc_box_head(model, conv_norm="")
no_weight_decay_on_norm(optimizer)
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
