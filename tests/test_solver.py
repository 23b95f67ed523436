"""The optimizer recipe (zero decay on GN γ/β) and linear LR scaling."""
import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from conftest import GN_FPN, TINY_OPTS  # noqa: E402
from gn_det.config import get_gn_cfg  # noqa: E402
from gn_det.solver import build_gn_optimizer, param_group_table, scale_schedule_linearly  # noqa: E402


def decay_of(optimizer):
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def test_gn_gamma_beta_get_zero_decay_and_weights_do_not():
    cfg = get_gn_cfg(GN_FPN, TINY_OPTS)
    model = build_model(cfg)
    optimizer = build_gn_optimizer(cfg, model)
    decay = decay_of(optimizer)
    norms = [p for m in model.modules() if isinstance(m, torch.nn.GroupNorm) for p in m.parameters()
             if p.requires_grad]
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
               and m.weight.requires_grad]
    assert len(norms) > 50 and len(weights) > 30
    assert all(decay[id(p)] == 0.0 for p in norms)
    assert all(decay[id(w)] == cfg.SOLVER.WEIGHT_DECAY == 1e-4 for w in weights)
    # frozen stem/res2 (FREEZE_AT 2) are not optimised at all
    frozen = model.backbone.bottom_up.stem.conv1.norm.weight
    assert not frozen.requires_grad and id(frozen) not in decay


def test_bias_decay_switch_and_table():
    cfg = get_gn_cfg(GN_FPN, TINY_OPTS + ["SOLVER.WEIGHT_DECAY_BIAS", "0.0"])
    model = build_model(cfg)
    optimizer = build_gn_optimizer(cfg, model)
    decay = decay_of(optimizer)
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert biases and all(decay[id(b)] == 0.0 for b in biases)
    table = param_group_table(model, optimizer)
    assert "GroupNorm γ/β" in table and "weight" in table and "weight decay" in table
    weight_row = next(line for line in table.splitlines() if line.startswith("| weight "))
    assert "0.0001" in weight_row


def test_linear_lr_scaling_from_16_to_2_images():
    cfg = get_gn_cfg(GN_FPN, ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.LINEAR_LR_SCALING", "True"])
    scale_schedule_linearly(cfg)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.02 * 2 / 16)
    assert cfg.SOLVER.MAX_ITER == 180000 * 8
    assert cfg.SOLVER.STEPS == (120000 * 8, 160000 * 8)
    assert cfg.SOLVER.WARMUP_ITERS == 1000 * 8
    assert cfg.SOLVER.CHECKPOINT_PERIOD == 5000 * 8
    # idempotent: the scaled config, dumped and re-scaled, stays the same
    scale_schedule_linearly(cfg)
    assert cfg.SOLVER.MAX_ITER == 180000 * 8 and cfg.SOLVER.BASE_LR == pytest.approx(0.0025)


def test_linear_lr_scaling_off_by_default():
    cfg = get_gn_cfg(GN_FPN, ["SOLVER.IMS_PER_BATCH", "2"])
    scale_schedule_linearly(cfg)
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SOLVER.MAX_ITER == 180000


@pytest.mark.slow
@pytest.mark.parametrize("clip", [False, True])
def test_cpu_optimizer_is_detectron2_sgd_run_fused(clip):
    """On CPU with MODEL.CPU_FAST_PATH gn-det's SGD keeps detectron2's groups and settings (and gradient
    clipping) and updates the parameters as detectron2's foreach SGD does, to float rounding, over steps with
    momentum and decay."""
    from detectron2.solver import build_optimizer

    cfg = get_gn_cfg(GN_FPN, TINY_OPTS + ["MODEL.CPU_FAST_PATH", "True", "SOLVER.CLIP_GRADIENTS.ENABLED", str(clip),
                                          "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.01"])
    torch.manual_seed(0)
    ours_model, stock_model = build_model(cfg), build_model(cfg)
    stock_model.load_state_dict(ours_model.state_dict())
    ours, stock = build_gn_optimizer(cfg, ours_model), build_optimizer(cfg, stock_model)
    assert all(group["fused"] and not group["foreach"] for group in ours.param_groups)
    assert [(len(g["params"]), g["lr"], g["weight_decay"], g["momentum"]) for g in ours.param_groups] == [
        (len(g["params"]), g["lr"], g["weight_decay"], g["momentum"]) for g in stock.param_groups]
    # detectron2's clipping subclass when clipping is on
    assert type(ours).__name__.endswith("WithGradientClip") == type(stock).__name__.endswith("WithGradientClip") == clip
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for ours_param, stock_param in zip(ours_model.parameters(), stock_model.parameters()):
            if ours_param.requires_grad:
                ours_param.grad = torch.randn(ours_param.shape, generator=generator)
                stock_param.grad = ours_param.grad.clone()
        ours.step(), stock.step()
    for ours_param, stock_param in zip(ours_model.parameters(), stock_model.parameters()):
        torch.testing.assert_close(ours_param, stock_param, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clip", [False, True])
def test_a_resumed_optimizer_keeps_the_step_its_config_asks_for(clip):
    """A checkpoint's optimizer groups carry the step of the optimizer that saved it (torch restores the
    ``foreach``/``fused`` flags): resumed without MODEL.CPU_FAST_PATH from a fast-path checkpoint, the run steps
    as detectron2's SGD does, and the other way round fused."""
    from detectron2.solver import build_optimizer

    clipping = ["SOLVER.CLIP_GRADIENTS.ENABLED", str(clip)]
    stock_cfg = get_gn_cfg(GN_FPN, TINY_OPTS + clipping)
    fast_cfg = get_gn_cfg(GN_FPN, TINY_OPTS + clipping + ["MODEL.CPU_FAST_PATH", "True"])
    model = build_model(stock_cfg)
    stock, fast = build_gn_optimizer(stock_cfg, model), build_gn_optimizer(fast_cfg, model)
    steps = [(g["foreach"], g["fused"]) for g in build_optimizer(stock_cfg, model).param_groups]
    assert [(g["foreach"], g["fused"]) for g in stock.param_groups] == steps and steps[0] == (True, None)
    assert type(stock).__name__.endswith("WithGradientClip") == type(fast).__name__.endswith("WithGradientClip") == clip
    stock_state, fast_state = stock.state_dict(), fast.state_dict()
    stock.load_state_dict(fast_state)
    fast.load_state_dict(stock_state)
    assert [(g["foreach"], g["fused"]) for g in stock.param_groups] == steps
    assert all(g["fused"] and not g["foreach"] for g in fast.param_groups)


def test_fused_sgd_steps_a_parameter_whose_first_gradient_comes_late_and_stays_fused_when_resumed():
    """torch's fused step takes a group's first step as all or nothing; a parameter that first gets a gradient
    after the others steps as torch's foreach SGD steps it, and a foreach optimizer's state loads fused."""
    from gn_det.cpu import fused_sgd

    def run(make):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
        opt = make(torch.optim.SGD([a, b], lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True))
        for step in range(3):
            a.grad = torch.full((5,), 1.0 + step)
            b.grad = torch.full((5,), 2.0 - step) if step else None
            opt.step()
        return a.detach(), b.detach(), opt

    fused_a, fused_b, fused = run(fused_sgd)
    stock_a, stock_b, stock = run(lambda sgd: sgd)
    torch.testing.assert_close(fused_a, stock_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused_b, stock_b, rtol=1e-6, atol=1e-7)
    assert all(group["fused"] and not group["foreach"] for group in fused.param_groups)
    fused.load_state_dict(stock.state_dict())
    assert all(group["fused"] and not group["foreach"] for group in fused.param_groups)
