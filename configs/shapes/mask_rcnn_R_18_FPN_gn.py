# LazyConfig twin of mask_rcnn_R_18_FPN_gn.yaml in fp32 (detectron2's own modules; the YAML one runs gn-det's
# CPU fast path): Mask R-CNN R-18-FPN trained from scratch on the synthetic shapes dataset (generated on first
# use) at 256 px, GN (G=32) in the backbone, FPN, 4conv1fc box head and mask head, FPN and heads 128 channels.
# The YAML config in fp32 reached 65.5 box AP / 72.3 mask AP on shapes_val (docs/RESULTS.md).
#   python3 tools/train_net.py --config-file configs/shapes/mask_rcnn_R_18_FPN_gn.py
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

import gn_det
from gn_det.lazy import no_weight_decay_on_norm, set_norm, use_4conv1fc_box_head

WIDTH = 128  # FPN and head channels: 3 classes of shapes need no 256, and the heads' convs dominate a CPU step
IMAGE_SIZE = 256

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1  # BasicBlock has its stride in its first 3x3 conv anyway
model.backbone.bottom_up.freeze_at = 0  # from scratch every stage trains
model.backbone.out_channels = WIDTH
# from scratch, the inputs are divided by the std too (Detectron's pretrained models were trained without)
model.pixel_std = [57.375, 57.12, 58.395]
rpn = model.proposal_generator
rpn.head.in_channels = WIDTH
rpn.anchor_generator.sizes = [[16], [32], [64], [128], [256]]  # objects span ~15-45% of a 256 px image
rpn.pre_nms_topk = (1000, 500)
rpn.post_nms_topk = (500, 250)
heads = model.roi_heads
heads.num_classes = 3
heads.batch_size_per_image = 128  # <= 5 objects per image
heads.box_head.input_shape.channels = heads.mask_head.input_shape.channels = WIDTH
use_4conv1fc_box_head(model, conv_dim=WIDTH)
heads.mask_head.conv_dims = [WIDTH] * 5
heads.box_predictor.test_topk_per_image = 20  # <= 5 objects: COCO AP unchanged, 5x less mask-head work
set_norm(model, gn_det.GN(num_groups=32))

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "shapes_train"
dataloader.test.dataset.names = "shapes_val"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(IMAGE_SIZE,), sample_style="choice", max_size=IMAGE_SIZE),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE)]
dataloader.train.mapper.instance_mask_format = "bitmask"  # the shapes masks are RLE
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = dataloader.test.num_workers = 1
# explicit: inferred from predictions, a model that detects nothing yet would report no mask AP
dataloader.evaluator.tasks = ("bbox", "segm")

optimizer = model_zoo.get_config("common/optim.py").SGD
no_weight_decay_on_norm(optimizer)
train = model_zoo.get_config("common/train.py").train
train.max_iter = 700
# LR 0.02, 50 warm-up iterations, divided by 10 at 560 and 650: the last fifth at LR/10 and /100
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[560, 650], num_updates=700),
    warmup_length=50 / 700,
    warmup_method="linear",
    warmup_factor=0.001,
)
train.checkpointer.period = 100
train.eval_period = 350
train.output_dir = "output/shapes/mask_rcnn_R_18_FPN_gn_py"
