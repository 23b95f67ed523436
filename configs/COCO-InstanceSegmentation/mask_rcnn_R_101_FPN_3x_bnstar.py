# R101-FPN 3x BN*, the same-schedule baseline for the 3x GN model. Paper: no number.
from .mask_rcnn_R_50_FPN_3x_bnstar import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
