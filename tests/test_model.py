from __future__ import annotations

import pytest
import torch

from hpo.model import DynamicCNN, ModelSpec, count_parameters
from hpo.params import model_spec

PARAMS = {"n_conv": 2, "filters_0": 8, "filters_1": 16, "kernel_size": 3, "n_fc": 1, "fc_size": 16, "dropout": 0.0}


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(filters=(16,), kernel_size=3, n_fc=1, fc_size=64),  # smallest corner
        ModelSpec(filters=(256, 256, 256, 256), kernel_size=5, n_fc=3, fc_size=1024),  # largest corner
        ModelSpec(filters=(32, 64), kernel_size=5, n_fc=0),  # no hidden FC layer
    ],
)
def test_output_shape_at_the_corners_of_the_space(spec):
    model = DynamicCNN(spec)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_blocks_are_conv_bn_relu_pool_then_fc_with_dropout():
    model = DynamicCNN(ModelSpec(filters=(8, 16), n_fc=2, fc_size=32, dropout=0.3))
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2
    head = [type(m).__name__ for m in model.head]
    assert head == ["Flatten", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert model.head[3].p == 0.3


def test_model_from_flat_trial_params_ignores_training_keys():
    params = dict(
        n_conv=2,
        filters_0=8,
        filters_1=16,
        kernel_size=3,
        n_fc=1,
        fc_size=32,
        dropout=0.1,
        optimizer="adam",
        lr=1e-3,
        batch_size=64,
        weight_decay=0.0,
    )
    model = DynamicCNN(model_spec(params))
    assert model.spec.filters == (8, 16)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0


def test_too_many_blocks_is_refused():
    with pytest.raises(ValueError, match="below 1px"):
        DynamicCNN(ModelSpec(filters=(8,) * 5))


def test_ensemble_averages_softmax_over_members_and_mirror_images():
    from hpo.model import Ensemble

    torch.manual_seed(0)
    a, b = DynamicCNN(model_spec(PARAMS)).eval(), DynamicCNN(model_spec({**PARAMS, "fc_size": 32})).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        one = Ensemble([a])(x)
        assert torch.allclose(one, a(x).log_softmax(1), atol=1e-6)  # one member: its own log-probabilities
        both = Ensemble([a, b], tta="flip")(x).exp()
        expected = torch.stack([m(v).softmax(1) for m in (a, b) for v in (x, x.flip(-1))]).mean(0)
    assert torch.allclose(both, expected, atol=1e-6)
    assert torch.allclose(both.sum(1), torch.ones(5), atol=1e-5)
