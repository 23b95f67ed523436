# Paper Table 6: R101-FPN 2x, GN everywhere. Paper: 41.8 box AP / 36.8 mask AP.
from .mask_rcnn_R_50_FPN_2x_gn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "catalog://ImageNetPretrained/FAIR/R-101-GN"
