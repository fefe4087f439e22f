"""Conversion of detectron2-format reference checkpoints and DINO weights onto this model's keys."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from retrieval.cli.convert import convert
from hassod.features.weights import WeightsFormatError
from hassod.model import DetectorSettings, build_detector, load_detector
from hassod.model.convert import convert_detectron2, convert_dino_resnet

RESNET_BLOCKS = (3, 4, 6, 3)
RESNET_WIDTHS = (64, 128, 256, 512)


def _norm(prefix: str, channels: int, counts: bool) -> dict[str, tuple[int, ...]]:
    fields = ("weight", "bias", "running_mean", "running_var")
    shapes = {f"{prefix}.norm.{f}": (channels,) for f in fields}
    if counts:  # SyncBN stores it, FrozenBN does not
        shapes[f"{prefix}.norm.num_batches_tracked"] = ()
    return shapes


def detectron2_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the reference's Cascade Mask R-CNN R50-FPN with level head.

    Names as detectron2 builds them (ResNet stem/res2..res5 with ``.norm``,
    FPN ``fpn_lateral``/``fpn_output`` with SyncBN, StandardRPNHead, three
    FastRCNNConvFCHead + FastRCNNOutputLayers with HASSOD's
    ``level_predictor``, MaskRCNNConvUpsampleHead), written out here
    independently of the converter.
    """
    s: dict[str, tuple[int, ...]] = {"backbone.bottom_up.stem.conv1.weight": (64, 3, 7, 7)}
    s.update(_norm("backbone.bottom_up.stem.conv1", 64, False))
    in_ch = 64
    for stage, (blocks, width) in enumerate(zip(RESNET_BLOCKS, RESNET_WIDTHS), start=2):
        out = 4 * width
        for b in range(blocks):
            p = f"backbone.bottom_up.res{stage}.{b}"
            if b == 0:
                s[f"{p}.shortcut.weight"] = (out, in_ch, 1, 1)
                s.update(_norm(f"{p}.shortcut", out, False))
            for i, shape in enumerate(((width, in_ch, 1, 1), (width, width, 3, 3), (out, width, 1, 1)), start=1):
                s[f"{p}.conv{i}.weight"] = shape
                s.update(_norm(f"{p}.conv{i}", shape[0], False))
            in_ch = out
    for level, channels in zip(range(2, 6), (256, 512, 1024, 2048)):
        s[f"backbone.fpn_lateral{level}.weight"] = (256, channels, 1, 1)
        s.update(_norm(f"backbone.fpn_lateral{level}", 256, True))
        s[f"backbone.fpn_output{level}.weight"] = (256, 256, 3, 3)
        s.update(_norm(f"backbone.fpn_output{level}", 256, True))
    rpn = "proposal_generator.rpn_head"
    s.update({f"{rpn}.conv.weight": (256, 256, 3, 3), f"{rpn}.conv.bias": (256,),
              f"{rpn}.objectness_logits.weight": (3, 256, 1, 1), f"{rpn}.objectness_logits.bias": (3,),
              f"{rpn}.anchor_deltas.weight": (12, 256, 1, 1), f"{rpn}.anchor_deltas.bias": (12,)})
    for k in range(3):
        s.update({f"roi_heads.box_head.{k}.fc1.weight": (1024, 256 * 7 * 7), f"roi_heads.box_head.{k}.fc1.bias": (1024,),
                  f"roi_heads.box_head.{k}.fc2.weight": (1024, 1024), f"roi_heads.box_head.{k}.fc2.bias": (1024,)})
        for name, rows in (("cls_score", 2), ("bbox_pred", 4), ("level_predictor", 3)):
            s[f"roi_heads.box_predictor.{k}.{name}.weight"] = (rows, 1024)
            s[f"roi_heads.box_predictor.{k}.{name}.bias"] = (rows,)
    for i in range(1, 5):
        s[f"roi_heads.mask_head.mask_fcn{i}.weight"] = (256, 256, 3, 3)
        s[f"roi_heads.mask_head.mask_fcn{i}.bias"] = (256,)
    s.update({"roi_heads.mask_head.deconv.weight": (256, 256, 2, 2), "roi_heads.mask_head.deconv.bias": (256,),
              "roi_heads.mask_head.predictor.weight": (1, 256, 1, 1), "roi_heads.mask_head.predictor.bias": (1,)})
    return s


def fake_detectron2_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values under detectron2's names; every tensor distinct, plus the RGB pixel buffers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (name, shape) in enumerate(detectron2_shapes().items()):
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000 + index)
        else:
            state[name] = torch.randn(shape, generator=generator)
    state["pixel_mean"] = torch.tensor([123.675, 116.280, 103.530]).view(3, 1, 1)
    state["pixel_std"] = torch.tensor([58.395, 57.120, 57.375]).view(3, 1, 1)
    return state


@pytest.fixture(scope="module")
def d2_state():
    return fake_detectron2_state()


@pytest.fixture(scope="module")
def model():
    return build_detector(DetectorSettings(), random_init=True)


def _fingerprint(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.numpy().tobytes())


def test_every_parameter_is_filled_from_its_source_and_nothing_is_left_over(d2_state, model):
    converted = convert_detectron2({"model": d2_state, "__author__": "test"})
    model.load_state_dict(converted, strict=True)  # no missing, no unexpected, shapes fit
    ours = model.state_dict()
    sources = {}
    for name, value in d2_state.items():
        sources.setdefault(_fingerprint(value), []).append(name)
    used = set()
    for key, value in ours.items():
        if key.endswith("num_batches_tracked") and key.startswith("backbone.body."):
            assert value.item() == 0, key  # FrozenBN-style source: filled with 0
            continue
        names = sources.get(_fingerprint(value))
        assert names is not None and len(names) == 1, f"{key} not filled from a unique source"
        used.add(names[0])
    assert set(d2_state) - used == {"pixel_mean", "pixel_std"}
    # A few pairs spelled out.
    pairs = {
        "backbone.body.conv1.weight": "backbone.bottom_up.stem.conv1.weight",
        "backbone.body.layer3.5.bn2.running_var": "backbone.bottom_up.res4.5.conv2.norm.running_var",
        "backbone.body.layer2.0.downsample.1.bias": "backbone.bottom_up.res3.0.shortcut.norm.bias",
        "backbone.fpn.inner_blocks.0.1.running_mean": "backbone.fpn_lateral2.norm.running_mean",
        "backbone.fpn.layer_blocks.3.0.weight": "backbone.fpn_output5.weight",
        "rpn.head.bbox_pred.weight": "proposal_generator.rpn_head.anchor_deltas.weight",
        "roi_heads.stages.2.box_head.fc6.weight": "roi_heads.box_head.2.fc1.weight",
        "roi_heads.stages.1.cls_score.bias": "roi_heads.box_predictor.1.cls_score.bias",
        "roi_heads.stages.0.level_predictor.weight": "roi_heads.box_predictor.0.level_predictor.weight",
        "roi_heads.mask_head.3.0.weight": "roi_heads.mask_head.mask_fcn4.weight",
        "roi_heads.mask_predictor.conv5_mask.weight": "roi_heads.mask_head.deconv.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias": "roi_heads.mask_head.predictor.bias",
    }
    for ours_key, d2_key in pairs.items():
        assert torch.equal(ours[ours_key], d2_state[d2_key]), ours_key


def test_mean_teacher_checkpoints_use_the_teacher_and_unknown_keys_are_refused(d2_state):
    small = {k: v for k, v in d2_state.items() if "box_predictor.0" in k}
    ensemble = {**{f"modelTeacher.{k}": v for k, v in small.items()},
                **{f"modelStudent.{k}": torch.zeros_like(v) for k, v in small.items()}}
    converted = convert_detectron2(ensemble)
    assert torch.equal(converted["roi_heads.stages.0.cls_score.weight"], small["roi_heads.box_predictor.0.cls_score.weight"])
    with pytest.raises(WeightsFormatError, match="roi_heads.keypoint_head"):
        convert_detectron2({"roi_heads.keypoint_head.score_lowres.weight": torch.zeros(1)})


def test_bgr_checkpoint_first_conv_sees_the_same_input(d2_state):
    """An MSRA-style checkpoint (BGR, 0-255 minus mean, std 1) gives the same first-conv output on our input."""
    conv1 = d2_state["backbone.bottom_up.stem.conv1.weight"]
    bgr = {"backbone.bottom_up.stem.conv1.weight": conv1,
           "pixel_mean": torch.tensor([103.530, 116.280, 123.675]).view(3, 1, 1),
           "pixel_std": torch.ones(3, 1, 1)}
    ours = convert_detectron2(bgr)["backbone.body.conv1.weight"]
    rgb = torch.rand(1, 3, 16, 16)
    d2_input = (rgb.flip(1) * 255 - bgr["pixel_mean"]) / bgr["pixel_std"]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    our_input = (rgb - mean) / std
    assert torch.allclose(F.conv2d(d2_input, conv1), F.conv2d(our_input, ours), rtol=1e-4, atol=1e-3)
    # The reference's own RGB/ImageNet buffers leave the weights untouched.
    same = convert_detectron2({**bgr, "pixel_mean": d2_state["pixel_mean"], "pixel_std": d2_state["pixel_std"]})
    assert torch.equal(same["backbone.body.conv1.weight"], conv1)
    with pytest.raises(WeightsFormatError, match="pixel_mean"):
        convert_detectron2({**bgr, "pixel_mean": torch.tensor([0.0, 0.0, 0.0])})


def test_dino_resnet_layouts_agree(d2_state):
    bottom_up = {k[len("backbone.bottom_up."):]: v for k, v in d2_state.items() if k.startswith("backbone.bottom_up.")}
    from_d2 = convert_dino_resnet(bottom_up)
    import torchvision

    expected = torchvision.models.resnet50().state_dict()
    assert set(from_d2) == {k for k in expected if not k.startswith("fc.")}
    assert all(from_d2[k].shape == expected[k].shape for k in from_d2)
    torchvision_layout = {f"module.{k}": v for k, v in from_d2.items()}
    torchvision_layout["fc.weight"] = torch.zeros(1000, 2048)
    again = convert_dino_resnet(torchvision_layout)
    assert set(again) == set(from_d2) and all(torch.equal(again[k], from_d2[k]) for k in again)


def test_convert_command_writes_a_loadable_checkpoint(d2_state, tmp_path):
    source = tmp_path / "model_final.pkl"
    with open(source, "wb") as handle:  # detectron2's .pkl: numpy arrays under "model"
        pickle.dump({"model": {k: v.numpy() for k, v in d2_state.items()}, "__author__": "test"}, handle)
    out = tmp_path / "converted.pth"
    result = CliRunner().invoke(convert, [str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model, settings = load_detector(out)
    assert settings == DetectorSettings()
    assert torch.equal(model.roi_heads.stages[2].level_predictor.weight, d2_state["roi_heads.box_predictor.2.level_predictor.weight"])
    again = CliRunner().invoke(convert, [str(out), "--out", str(tmp_path / "again.pth")])
    assert again.exit_code != 0 and "is already a hassod detector checkpoint" in again.output
    (tmp_path / "bad.pkl").write_bytes(b"nope")
    result = CliRunner().invoke(convert, [str(tmp_path / "bad.pkl"), "--out", str(tmp_path / "x.pth")])
    assert result.exit_code != 0 and "cannot read" in result.output
