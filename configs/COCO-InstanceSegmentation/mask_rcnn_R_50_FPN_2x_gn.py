# Paper Table 6: R50-FPN 2x, GN in backbone, FPN, box and mask head. Paper: 40.3 box AP / 35.7 mask AP.
# LazyConfig twin of mask_rcnn_R_50_FPN_2x_gn.yaml (same modules and parameter names, tests/test_lazy.py): the
# BN* baseline beside it (detectron2's configs/common model, data, optimizer and 2x schedule, 4conv1fc box head,
# no weight decay on norm gamma/beta) with GN (G=32) at every norm site but the RPN, stride in the 3x3 conv,
# fine-tuned from Detectron's GN ImageNet model.
import gn_det
from gn_det.lazy import set_norm

from .mask_rcnn_R_50_FPN_2x_bnstar import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.stride_in_1x1 = False  # as Detectron's GN ImageNet models
set_norm(model, gn_det.GN(num_groups=32))
train.init_checkpoint = "catalog://ImageNetPretrained/FAIR/R-50-GN"
