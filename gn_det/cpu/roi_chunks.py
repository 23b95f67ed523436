"""Chunked CPU inference of the heads that run per RoI.

A box head sees ~1000 RoIs per image at inference; one of its layers' activations (1000 x 256 x 7 x 7 bf16,
25 MB per image) does not fit in a CPU's cache, so the norm and ReLU after each conv read it back from memory.
Run on chunks of a few hundred RoIs, each activation is still in cache when the next layer reads it.
"""
import torch

from detectron2.config import configurable

# Activation bytes per chunk of RoIs in CPU inference: one layer's output for ~330 box-head RoIs (7x7x256 bf16)
# or ~80 mask-head RoIs (14x14x256) stays in cache for the norm, ReLU and next conv that read it back
# (the chunk sizes compared: docs/SPEED.md).
INFERENCE_CHUNK_BYTES = 8 * 2**20


class RoIChunkedInference:
    """Mixin for a head that runs per RoI: in CPU inference, RoIs go through it in chunks of
    ``inference_chunk_bytes`` of activation (0: all at once, detectron2's behaviour).

    Every layer of these heads treats each RoI alone (convs, GroupNorm and FrozenBN per sample, FC per row),
    so chunking changes no arithmetic, only the rounding of kernels whose blocking depends on the number of
    RoIs per call; it keeps each layer's activation small enough to stay in the CPU's cache
    between the conv that writes it and the norm and ReLU that read it, instead of going through memory.
    ``inference_chunk_bytes`` is a constructor argument; the heads' ``from_config`` set it to
    ``INFERENCE_CHUNK_BYTES`` with ``MODEL.CPU_FAST_PATH``. Training never chunks (no gain measured), nor does a
    head whose input is off the CPU (a GPU wants large batches).
    """

    @configurable
    def __init__(self, *, inference_chunk_bytes=0, **kwargs):
        super().__init__(**kwargs)
        self.inference_chunk_bytes = inference_chunk_bytes

    def extra_repr(self):
        # print(model) shows whether CPU inference runs in chunks
        return f"inference_chunk_bytes={self.inference_chunk_bytes}" if self.inference_chunk_bytes else ""

    def run_in_chunks(self, run, x):
        """``run(x)``, or ``run`` over chunks of the RoIs (dim 0) of ``x`` concatenated."""
        budget = self.inference_chunk_bytes
        if not budget or self.training or x.device.type != "cpu" or len(x) == 0:
            return run(x)
        rois_per_chunk = max(1, budget // (x[0].numel() * x.element_size()))
        if torch.jit.is_tracing():
            return torch.cat(traceable_chunks(run, x, rois_per_chunk))
        if len(x) <= rois_per_chunk:
            return run(x)
        return torch.cat([run(chunk) for chunk in x.split(rois_per_chunk)])


def traceable_chunks(run, x, rois_per_chunk):
    """``run`` over chunks of ``x`` in a form torch.jit.trace records for any number of RoIs.

    The traced file splits every input into as many chunks as the traced example needed (``len(x)`` is a constant
    of the trace), each ``ceil(n / chunks)`` RoIs at run time: the same arithmetic per RoI for any ``n``, chunks
    of at most ``rois_per_chunk`` RoIs up to the traced example's count (the RoI heads' count is fixed by
    ``MODEL.RPN.POST_NMS_TOPK_TEST`` and ``TEST.DETECTIONS_PER_IMAGE``; export with an image that reaches it).
    """
    chunks = max(1, -(-len(x) // rois_per_chunk))
    return [run(chunk) for chunk in torch.tensor_split(x, chunks)]
