from __future__ import annotations

import pytest
import torch

from hpo.learn.model import DynamicCNN, ModelSpec, count_parameters
from hpo.learn.params import model_spec

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
    # By hand: convs 1*8*9 + 8*16*9 (no bias), BatchNorm 2*8 + 2*16, FC (16*7*7)*32 + 32, out 32*10 + 10.
    assert count_parameters(model) == 72 + 1152 + 16 + 32 + 784 * 32 + 32 + 330


def test_too_many_blocks_is_refused():
    with pytest.raises(ValueError, match="below 1px"):
        DynamicCNN(ModelSpec(filters=(8,) * 5))


def test_ensemble_averages_softmax_over_members_and_mirror_images():
    from hpo.learn.model import Ensemble

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


RESIDUAL = {
    "n_conv": 3,
    "filters_0": 16,
    "growth": 2.0,
    "kernel_size": 3,
    "residual": True,
    "pool": "avg",
    "n_fc": 1,
    "fc_size": 32,
    "dropout": 0.1,
}


def test_a_residual_point_grows_its_width_per_stage_and_pools_before_the_head():
    model = DynamicCNN(model_spec(RESIDUAL))
    assert model.spec.filters == (16, 32, 64)  # filters_0, then growth times wider per block
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["ResidualBlock", "MaxPool2d"] * 3
    first = model.features[0]
    assert type(first.shortcut).__name__ == "Sequential"  # 1 -> 16 channels: a 1x1 projection
    assert [type(m).__name__ for m in model.head][:3] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert model.head[2].in_features == 64  # the pooled head sees channels, not pixels
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_the_shortcut_carries_the_input_where_the_width_stays():
    from hpo.learn.model import ResidualBlock

    block = ResidualBlock(8, 8, 3).eval()
    for m in block.body:  # a body that outputs zeros: the block is then relu(x)
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.zeros_(m.weight)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        assert torch.allclose(block(x), x.relu())


def test_an_unknown_pool_is_refused():
    with pytest.raises(ValueError, match="pool must be one of"):
        DynamicCNN(ModelSpec(filters=(8,), pool="max"))


def test_a_residual_point_trains_predicts_and_exports(tmp_path):
    """Every point of the space must come out of the finalizer usable: trained, loaded back from
    model.pt as `hpo predict` loads it, and exported to a file that agrees with it."""
    from hpo.learn import checkpoints
    from hpo.learn.data import DeviceData
    from hpo.learn.inference import check_export, export, load_model
    from hpo.learn.params import TrialParams
    from hpo.learn.train import TrainingRun, evaluate, fit, seeded_model
    from hpo.settings import config

    flat = {**RESIDUAL, "optimizer": "sgd", "lr_sgd": 0.05, "batch_size": 32, "weight_decay": 1e-4}
    params = TrialParams.from_flat(flat)
    assert params.flat() == flat  # the flat form round-trips: growth, the shape keys and lr_sgd
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (256,), generator=generator)
    images = torch.rand(256, 1, 28, 28, generator=generator) * 0.2 + labels.view(-1, 1, 1, 1) * 0.08
    data = DeviceData(images, labels, torch.device("cpu"))
    cfg = config.load("tiny")
    model = seeded_model(params.model, 0, data.device)
    before = evaluate(model, data).loss
    history = fit(model, data, data, TrainingRun(params.optimizer, cfg.train, cfg.augment, 3, 0))
    assert history[-1].val_loss < before  # it learns

    checkpoint = {
        "format": checkpoints.FINAL_FORMAT,
        "study": "tiny",
        "trial": 0,
        "params": flat,
        "tta": "flip",
        "members": [{"trial": 0, "params": flat, "seed": 0, "state_dict": model.state_dict()}],
        "test_accuracy": 0.0,
        "hpo_version": "test",
    }
    torch.save(checkpoint, tmp_path / "model.pt")
    loaded, meta = load_model(tmp_path / "model.pt", "tiny")
    pixels = (images[:64, 0] * 255).to(torch.uint8).numpy()
    for fmt in ("torchscript", "onnx"):
        export(loaded, meta, fmt, tmp_path / f"model.{fmt}")
        check = check_export(loaded, tmp_path / f"model.{fmt}", fmt, pixels)
        assert check.ok, (fmt, check)
