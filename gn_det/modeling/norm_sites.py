"""Glue between a YAML config and detectron2's builders: "GN" becomes gn-det's GroupNormSpec.

detectron2's builders read each site's norm from the config and hand it to ``get_norm``, which accepts a
callable. Giving them a copy of the config whose "GN" keys hold a :class:`~gn_det.layers.GroupNormSpec` lets
gn-det reuse those builders unchanged (ResNet stages, FPN, box/mask/RetinaNet heads) with a configurable
GroupNorm; every other norm name stays the string detectron2 reads. The config was checked when it was loaded
(:func:`gn_det.config.get_gn_cfg`); builders trust it.
"""
from gn_det.config import NORM_SITE_KEYS, select
from gn_det.cpu import NCHWCopyGroupNorm
from gn_det.layers import GroupNorm, GroupNormSpec, check_norm_sites, use_ws_convs


def gn_spec(cfg):
    """The GroupNormSpec of ``cfg``'s ``MODEL.GN``; with ``MODEL.CPU_FAST_PATH`` it builds NCHWCopyGroupNorm."""
    return GroupNormSpec.from_config(cfg, NCHWCopyGroupNorm if cfg.MODEL.CPU_FAST_PATH else GroupNorm)


def with_gn_specs(cfg):
    """A copy of ``cfg`` whose norm-site keys (``NORM_SITE_KEYS``) that say "GN" hold :func:`gn_spec`."""
    resolved = cfg.clone()
    resolved.defrost()
    spec = gn_spec(cfg)
    for key in NORM_SITE_KEYS:
        if select(cfg, key) == "GN":
            *path, leaf = key.split(".")
            select(resolved, ".".join(path))[leaf] = spec
    return resolved


def finish_norm_sites(module, ws, prefix):
    """Check every GroupNorm of a freshly built ``module`` and give it GN+WS convs when ``ws``.

    ``prefix`` is the module's path inside the meta-architecture, so an error names the full layer path.
    """
    check_norm_sites(module, prefix)
    if ws:
        use_ws_convs(module)
    return module
