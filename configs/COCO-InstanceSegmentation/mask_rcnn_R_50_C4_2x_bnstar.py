# Paper Table 4: R50-C4, BN* (frozen BN) in backbone and the res5 head. Paper: 37.7 box AP / 32.8 mask AP.
# LazyConfig twin of mask_rcnn_R_50_C4_2x_bnstar.yaml, on detectron2's configs/common C4 model (res5 runs as the
# ROI head and takes the backbone's norm). Paper Table 4 was trained with 1 image per GPU on 8 GPUs: 8 images,
# LR 0.01, the 2x iterations doubled (360k, steps 240k and 320k: the same fractions as the 2x schedule).
from detectron2 import model_zoo

from ..common.paper_recipe import dataloader, lr_multiplier, optimizer, train

model = model_zoo.get_config("common/models/mask_rcnn_c4.py").model
model.backbone.freeze_at = 2
dataloader.train.total_batch_size = 8
optimizer.lr = 0.01
train.max_iter = 360000
lr_multiplier.warmup_length = 1000 / train.max_iter
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
