import pytest
import torch
import torchvision

from posetune.config import ModelConfig
from posetune.errors import ConfigError
from posetune.train.model import BACKBONES, create_backbone, create_model, list_backbones


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_predicts_unit_quaternions(name):
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone=name, translation_head=[16], orientation_head=[16])).eval()
    with torch.no_grad():
        translation, quaternion = model(torch.rand(2, 3, 64, 96))
    assert translation.shape == (2, 3) and quaternion.shape == (2, 4)
    assert torch.allclose(quaternion.norm(dim=1), torch.ones(2), atol=1e-5)


def test_reference_shape_vgg16_features_and_heads():
    model = create_model(ModelConfig())
    assert model.translation_head[0].in_features == 25088  # VGG16 without classifier, 7x7x512
    widths = [m.out_features for m in model.orientation_head if isinstance(m, torch.nn.Linear)]
    assert widths == [256, 64, 4]


def test_pool_size_keeps_a_spatial_grid():
    _, width = create_backbone("resnet18", pool_size=3)
    assert width == 512 * 9
    model = create_model(ModelConfig(backbone="mobilenet_v3_small", pool_size=2, translation_head=[8]))
    assert model.translation_head[0].in_features == 576 * 4
    assert model(torch.rand(1, 3, 64, 64))[0].shape == (1, 3)


def test_symmetric_predicts_translation_only():
    model = create_model(ModelConfig(backbone="resnet18"), symmetric=True)
    translation, quaternion = model(torch.rand(1, 3, 64, 64))
    assert translation.shape == (1, 3) and quaternion is None and model.orientation_head is None


def test_translation_output_is_centred_on_the_training_labels():
    model = create_model(ModelConfig(backbone="resnet18", translation_head=[8]))
    labels = torch.tensor([[0.0, -0.1, 1.5], [0.2, -0.3, 1.9]])
    model.set_translation_stats(labels)
    torch.nn.init.zeros_(model.translation_head[-1].weight)
    torch.nn.init.zeros_(model.translation_head[-1].bias)
    assert torch.allclose(model.eval()(torch.rand(1, 3, 64, 64))[0], labels.mean(0))
    assert "translation_mean" in model.state_dict()


def test_unknown_backbone_lists_the_valid_names():
    from posetune.config import load_config
    from posetune.train.model import create_backbone

    with pytest.raises(ConfigError) as err:  # when the config is read, before any model is built
        load_config(overrides=["model.backbone=vgg61"], environ={})
    assert "model.backbone = 'vgg61'" in str(err.value)
    assert ", ".join(list_backbones()) in str(err.value)
    with pytest.raises(ConfigError, match=", ".join(list_backbones())):  # the registry's own lookup
        create_backbone("vgg61")


def test_pretrained_weights_come_from_a_local_file(tmp_path, caplog):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    with caplog.at_level("INFO", logger="posetune.train.model"):
        backbone, _ = create_backbone("resnet18", str(tmp_path / "resnet18.pth"))
    assert torch.equal(backbone.conv1.weight, reference.conv1.weight)
    assert f"loaded resnet18 weights from {tmp_path / 'resnet18.pth'}" in caplog.text


def test_batchnorm_momentum_is_set_on_every_norm_layer():
    backbone, _ = create_backbone("mobilenet_v3_small", batchnorm_momentum=0.1)
    momenta = {m.momentum for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}
    default, _ = create_backbone("mobilenet_v3_small")
    assert {m.momentum for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}


def test_bad_pretrained_weights_are_config_errors(tmp_path):
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "m.pth")
    with pytest.raises(ConfigError, match="does not fit resnet18"):
        create_backbone("resnet18", str(tmp_path / "m.pth"))
    with pytest.raises(ConfigError, match="file not found"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot read"):
        create_backbone("resnet18", str(tmp_path / "junk.pth"))
