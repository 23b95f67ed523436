"""Chunked CPU inference of the heads that run per RoI: part of the fast path (docs/SPEED.md).

A box head sees ~1000 RoIs per image at inference; one of its layers' activations (1000 x 256 x 7 x 7 bf16,
25 MB per image) does not fit in a CPU's cache, so the norm and ReLU after each conv read it back from memory.
Run on chunks of a few hundred RoIs, each activation is still in cache when the next layer reads it.
"""
import torch

# Activation bytes per chunk of RoIs in CPU inference: one layer's output for ~330 box-head RoIs (7x7x256 bf16)
# or ~80 mask-head RoIs (14x14x256) stays in cache for the norm, ReLU and next conv that read it back.
# Measured (docs/SPEED.md, R50-FPN fast path, 2 images of 512 px): 2.87 s per inference call with all RoIs at
# once, 2.70 / 2.63 / 2.68 s with 4 / 8 / 16 MiB chunks.
INFERENCE_CHUNK_BYTES = 8 * 2**20


class RoIChunkedInference:
    """Mixin for a head that runs per RoI: in CPU inference with the fast path, RoIs go through it in chunks.

    Every layer of these heads treats each RoI alone (convs, GroupNorm and FrozenBN per sample, FC per row),
    so chunking changes no output; it keeps each layer's activation small enough to stay in the CPU's cache
    between the conv that writes it and the norm and ReLU that read it, instead of going through memory.
    ``inference_chunk_bytes`` is 0 (off) unless :func:`use_chunked_roi_inference` sets it. Training (measured
    gain nil) never chunks, nor does CUDA (not measured there; a GPU wants large batches, not cache locality).
    """

    inference_chunk_bytes = 0

    def run_in_chunks(self, run, x):
        """``run(x)``, or ``run`` over chunks of the RoIs (dim 0) of ``x`` concatenated."""
        budget = self.inference_chunk_bytes
        if not budget or self.training or x.device.type != "cpu" or len(x) == 0:
            return run(x)
        rois_per_chunk = max(1, budget // (x[0].numel() * x.element_size()))
        if len(x) <= rois_per_chunk:
            return run(x)
        return torch.cat([run(chunk) for chunk in x.split(rois_per_chunk)])


def use_chunked_roi_inference(model, chunk_bytes=INFERENCE_CHUNK_BYTES):
    """Turn on chunked CPU inference in every :class:`RoIChunkedInference` head of ``model``, in place."""
    for module in model.modules():
        if isinstance(module, RoIChunkedInference):
            module.inference_chunk_bytes = chunk_bytes
    return model
