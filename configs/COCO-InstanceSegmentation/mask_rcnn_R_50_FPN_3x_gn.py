# Paper Table 6: R50-FPN long schedule (270k), GN everywhere. Paper: 40.8 box AP / 36.1 mask AP.
from detectron2 import model_zoo

from .mask_rcnn_R_50_FPN_2x_gn import dataloader, model, optimizer, train

# 3x: 270k iterations, LR divided by 10 at 210k and 250k
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_3x
train.max_iter = 270000
