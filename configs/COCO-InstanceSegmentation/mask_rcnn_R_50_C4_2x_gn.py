# Paper Table 4: R50-C4, GN in backbone and the res5 head. Paper: 38.8 box AP / 33.6 mask AP.
import gn_det
from gn_det.lazy import set_norm

from .mask_rcnn_R_50_C4_2x_bnstar import dataloader, lr_multiplier, model, optimizer, train

# stride in the 3x3 conv, as Detectron's GN ImageNet models
model.backbone.stages.stride_in_1x1 = model.roi_heads.res5.stride_in_1x1 = False
set_norm(model, gn_det.GN(num_groups=32))
train.init_checkpoint = "catalog://ImageNetPretrained/FAIR/R-50-GN"
