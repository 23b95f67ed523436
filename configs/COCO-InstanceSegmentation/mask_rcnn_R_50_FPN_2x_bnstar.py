# Paper Table 5 (BN* backbone, 4conv1fc head, no head norm) and Table 6 R50-FPN 2x BN*. Paper: 38.6 box AP / 34.2 (T5), 34.5 (T6) mask AP.
# LazyConfig twin of mask_rcnn_R_50_FPN_2x_bnstar.yaml: detectron2's configs/common model (FrozenBN backbone,
# stride in the 1x1 conv, no norm in FPN and heads) with the same 4conv1fc box head as the GN models, so the
# two differ only in normalization. Fine-tuned from the MSRA BN ImageNet model with the paper's 2x recipe.
from detectron2 import model_zoo

from gn_det.lazy import use_4conv1fc_box_head

from ..common.paper_recipe import dataloader, lr_multiplier, optimizer, train

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up.freeze_at = 2
use_4conv1fc_box_head(model, conv_norm="")
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
