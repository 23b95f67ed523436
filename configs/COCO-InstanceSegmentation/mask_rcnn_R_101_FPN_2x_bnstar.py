# Paper Table 6: R101-FPN 2x BN*. Paper: 40.9 box AP / 36.4 mask AP.
from .mask_rcnn_R_50_FPN_2x_bnstar import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
