# Paper Table 6: R101-FPN long schedule (270k), GN everywhere. Paper: 42.3 box AP / 37.2 mask AP.
from .mask_rcnn_R_50_FPN_3x_gn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "catalog://ImageNetPretrained/FAIR/R-101-GN"
