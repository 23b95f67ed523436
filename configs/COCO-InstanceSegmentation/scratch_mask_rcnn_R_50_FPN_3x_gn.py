# Paper Table 7: R50-FPN GN trained from scratch (random init), 270k. Paper: 39.5 box AP / 35.2 mask AP.
from .mask_rcnn_R_50_FPN_3x_gn import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = ""
model.backbone.bottom_up.freeze_at = 0  # from scratch every stage trains
