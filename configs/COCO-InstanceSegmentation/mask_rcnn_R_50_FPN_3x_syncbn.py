# SyncBN baseline (not in the paper): BN synchronised across GPUs in backbone, FPN and heads, 3x. detectron2's zoo: 41.9 box AP / 37.8 mask AP.
# The heads take detectron2's "naiveSyncBN_N" (statistics weighted by each GPU's batch), which, unlike
# torch's SyncBatchNorm, accepts a GPU whose batch holds no RoI; new_baselines/*_LSJ.py does the same with a
# lambda. The YAML twin also runs PreciseBN before each evaluation, which this LazyConfig path does not.
from gn_det.lazy import set_norm

from .mask_rcnn_R_50_FPN_3x_bnstar import dataloader, lr_multiplier, model, optimizer, train

set_norm(model, "SyncBN")
model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "naiveSyncBN_N"
