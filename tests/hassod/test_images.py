from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hassod.images import ImageError, list_images, load_rgb, resize_image


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = 255  # left half white
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_rgb(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)
    assert out[:15].mean() > 200 and out[25:].mean() < 50  # white half now on top


def test_modes_become_rgb_uint8(tmp_path):
    gray = (np.arange(100, dtype=np.uint8).reshape(10, 10))
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "g.png")[..., 1], gray)

    sixteen = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)
    Image.fromarray(sixteen).save(tmp_path / "s.png")
    out = load_rgb(tmp_path / "s.png")
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)  # scaled, not clipped at 255

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out[0, 0].tolist() == [255, 0, 0] and out[3, 3].tolist() == [255, 255, 255]


def test_bad_inputs_raise_clear_errors(bad_inputs):
    messages = {}
    for kind, path in bad_inputs.items():
        with pytest.raises(ImageError) as info:
            load_rgb(path, max_pixels=50_000_000)
        messages[kind] = str(info.value)
    assert "not an image" in messages["notes"]
    assert "not an image" in messages["empty"]
    assert "unreadable" in messages["truncated"] or "truncated" in messages["truncated"]
    assert "too large" in messages["huge"] and "9000x8000" in messages["huge"]


def test_list_images_leaves_out_what_the_command_writes(tmp_path, monkeypatch):
    for name in ("a.png", "out.json", "out.json.progress.jsonl", "viz/a.png", "idx/catalog.sqlite", "idx.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # relative and absolute spellings name the same files
    found = list_images([tmp_path], exclude=["out.json", tmp_path / "out.json.progress.jsonl", "viz", "idx/", None])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.png", "idx.png"]


def test_list_images_recursive_sorted_without_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ["b/2.jpg", "1.png", ".x.jpg", ".hidden/3.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path])] == ["1.png", "b/2.jpg"]
    with pytest.raises(FileNotFoundError):
        list_images([tmp_path / "missing"])


@pytest.mark.parametrize("strip_elements", [1 << 22, 3 * 131 * 5, 1])
def test_resize_in_strips_equals_torchs_antialiased_bilinear(monkeypatch, strip_elements):
    # resample works on rows a strip at a time (5 rows, 1 row), then on the
    # columns: the result must be exactly one 2-D torch call, down and up.
    import torch
    import torch.nn.functional as F

    from hassod import images

    monkeypatch.setattr(images, "_RESIZE_STRIP_ELEMENTS", strip_elements)
    image = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)
    for size in ((40, 50), (97, 131), (150, 200), (30, 260)):
        ours = resize_image(image, size)
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        reference = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
        reference = reference[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        assert ours.shape == (*size, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, reference)
    checkerboard = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    grey = resize_image(np.repeat(checkerboard[:, :, None], 3, axis=2), (8, 8))
    assert np.abs(grey.astype(int) - 128).max() <= 1  # averaged, not sampled
