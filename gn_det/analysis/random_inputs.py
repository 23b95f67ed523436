"""Deterministic random detection inputs in detectron2's batched-input format.

Used wherever a model must run without a dataset: the build/forward tests and tools/benchmark.py.
"""
import torch

from detectron2.structures import BitMasks, Boxes, Instances


def random_detection_batch(num_images=2, height=128, width=128, num_classes=3, boxes_per_image=3, seed=0):
    """A list of ``{"image", "height", "width", "instances"}`` dicts with box + mask ground truth.

    Images are uint8-range float CHW tensors; every instance is a filled rectangle (its box and mask agree).
    """
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = torch.randint(0, 256, (3, height, width), generator=gen).float()
        x0 = torch.randint(0, width // 2, (boxes_per_image,), generator=gen)
        y0 = torch.randint(0, height // 2, (boxes_per_image,), generator=gen)
        bw = torch.randint(width // 8, width // 2, (boxes_per_image,), generator=gen)
        bh = torch.randint(height // 8, height // 2, (boxes_per_image,), generator=gen)
        boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1).float()
        masks = torch.zeros(boxes_per_image, height, width, dtype=torch.bool)
        for i, (a, b, c, d) in enumerate(boxes.long().tolist()):
            masks[i, b:d, a:c] = True
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, num_classes, (boxes_per_image,), generator=gen)
        instances.gt_masks = BitMasks(masks)
        batch.append({"image": image, "height": height, "width": width, "instances": instances})
    return batch
