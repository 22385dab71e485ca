"""The adapter g (shapes, presets, residual structure, input normalisation) and the EMA teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vla.models.proclip.adapter import Adapter, AdapterConfig
from vla.models.proclip.ema import EMA, ema_update, make_ema_teacher

# --- adapter -------------------------------------------------------------------------------------


def test_output_shape_and_config() -> None:
    adapter = Adapter(in_dim=12, out_dim=5, blocks=2, expansion=3)
    assert adapter(torch.randn(7, 12)).shape == (7, 5)
    assert adapter.config == AdapterConfig(12, 5, blocks=2, expansion=3)
    assert len(adapter.blocks) == 2
    assert adapter.blocks[0].fc1.out_features == 36  # expansion × in_dim
    assert adapter.blocks[0].fc2.out_features == 12  # back to in_dim: the block is residual


@pytest.mark.parametrize(("name", "blocks", "expansion"), [("proclip", 1, 8), ("llm2clip", 4, 2)])
def test_presets(name: str, blocks: int, expansion: int) -> None:
    config = AdapterConfig.preset(name, 16, 4)
    assert (config.blocks, config.expansion) == (blocks, expansion)
    assert config == getattr(AdapterConfig, name)(16, 4)
    adapter = Adapter.from_config(config)
    assert adapter.config == config
    assert len(adapter.blocks) == blocks
    assert adapter.blocks[0].fc1.out_features == expansion * 16


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown adapter preset"):
        AdapterConfig.preset("nope", 4, 4)
    with pytest.raises(ValueError, match="blocks"):
        AdapterConfig(4, 4, blocks=0)


def test_zeroed_w2_makes_every_block_the_identity() -> None:
    adapter = Adapter(8, 3, blocks=4, expansion=2)
    with torch.no_grad():
        for block in adapter.blocks:
            block.fc2.weight.zero_()
            block.fc2.bias.zero_()
    x = torch.randn(5, 8)
    expected = adapter.proj(adapter.norm(F.normalize(x, dim=-1)))
    torch.testing.assert_close(adapter(x), expected)


def test_input_scale_does_not_change_the_output() -> None:
    adapter = Adapter(8, 3)
    x = torch.randn(5, 8)
    torch.testing.assert_close(adapter(x), adapter(37.5 * x))


def test_state_dict_round_trip() -> None:
    config = AdapterConfig.llm2clip(8, 3)
    source, target = Adapter.from_config(config), Adapter.from_config(config)
    target.load_state_dict({k: v.clone() for k, v in source.state_dict().items()})
    x = torch.randn(2, 8)
    torch.testing.assert_close(source(x), target(x))


# --- EMA -----------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(2)  # has buffers (running stats)


def _fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.norm.running_mean.fill_(value)


def test_make_ema_teacher_is_a_frozen_eval_copy() -> None:
    student = _Tiny().train()
    teacher = make_ema_teacher(student)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (_, ps), (_, pt) in zip(student.named_parameters(), teacher.named_parameters()):
        assert torch.equal(ps, pt) and ps.data_ptr() != pt.data_ptr()


def test_ema_update_one_step_with_momentum_09() -> None:
    student = _Tiny()
    teacher = make_ema_teacher(student)
    _fill(teacher, 1.0)
    _fill(student, 3.0)
    ema_update(teacher, student, momentum=0.9)
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.9 * 1.0 + 0.1 * 3.0))
    # buffers are copied, not averaged
    torch.testing.assert_close(teacher.norm.running_mean, torch.full((2,), 3.0))


def test_momentum_one_keeps_a_frozen_copy() -> None:
    student = _Tiny()
    ema = EMA(student, momentum=1.0)
    before = {k: v.clone() for k, v in ema.teacher.state_dict().items()}
    _fill(student, 5.0)
    ema.update(student)
    after = ema.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_momentum_is_refused() -> None:
    with pytest.raises(ValueError, match="momentum"):
        EMA(_Tiny(), momentum=1.5)
