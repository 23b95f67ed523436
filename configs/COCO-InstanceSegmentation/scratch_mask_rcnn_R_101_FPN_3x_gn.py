# Paper Table 7: R101-FPN GN trained from scratch (random init), 270k. Paper: 41.0 box AP / 36.4 mask AP.
from .mask_rcnn_R_101_FPN_3x_gn import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = ""
model.backbone.bottom_up.freeze_at = 0  # from scratch every stage trains
