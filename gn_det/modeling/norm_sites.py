"""Glue between a config and detectron2's builders: norm names become gn-det norm factories.

detectron2's builders read each site's norm from the config and hand it to ``get_norm``, which accepts a
callable. Giving them a copy of the config whose norm keys hold gn-det factories lets gn-det reuse those
builders unchanged (ResNet stages, FPN, box/mask/RetinaNet heads) with a configurable GroupNorm.
"""
from gn_det.config import NORM_SITE_KEYS, check_gn_config
from gn_det.cpu import NCHWCopyGroupNorm, cpu_fast_path
from gn_det.layers import GroupNorm, check_norm_sites, norm_factory, use_ws_convs


def with_norm_factories(cfg):
    """A copy of ``cfg`` whose norm-site keys (``NORM_SITE_KEYS``) hold norm factories instead of names.

    Their "GN" builds gn-det's GroupNorm, or with ``MODEL.CPU_FAST_PATH`` its CPU subclass NCHWCopyGroupNorm.
    """
    check_gn_config(cfg)
    resolved = cfg.clone()
    resolved.defrost()
    gn = cfg.MODEL.GN
    group_norm = NCHWCopyGroupNorm if cpu_fast_path(cfg) else GroupNorm
    for key in NORM_SITE_KEYS:
        *path, leaf = key.split(".")
        node = resolved
        for part in path:
            node = node[part]
        node[leaf] = norm_factory(
            node[leaf], num_groups=gn.NUM_GROUPS, dim_per_group=gn.DIM_PER_GROUP, eps=gn.EPS, key=key,
            group_norm=group_norm,
        )
    return resolved


def finish_norm_sites(module, cfg, prefix):
    """Check every GroupNorm of a freshly built ``module`` and apply GN+WS when ``MODEL.GN.WS`` is set.

    ``prefix`` is the module's path inside the meta-architecture, so an error names the full layer path.
    """
    check_norm_sites(module, prefix)
    if cfg.MODEL.GN.WS:
        use_ws_convs(module)
    return module
