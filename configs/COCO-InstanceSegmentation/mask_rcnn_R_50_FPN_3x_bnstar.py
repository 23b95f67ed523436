# R50-FPN 3x BN*, the same-schedule baseline for the 3x GN model. Paper: no number (detectron2's zoo, 2fc head: 41.0 / 37.2).
from detectron2 import model_zoo

from .mask_rcnn_R_50_FPN_2x_bnstar import dataloader, model, optimizer, train

# 3x: 270k iterations, LR divided by 10 at 210k and 250k
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_3x
train.max_iter = 270000
