import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import cache
import data
from cli import UserError
from helpers import write_jpegs, write_phone_photo

NAMES = [f"{i:06d}.jpg" for i in range(1, 13)]
PARTITION = {n: i % 3 for i, n in enumerate(NAMES)}  # 0 train, 1 valid, 2 test


def expected(split):
    return sorted(n for n, p in PARTITION.items() if data.SPLITS[p] == split)


def make_torchvision(root):
    write_jpegs(os.path.join(root, "celeba", "img_align_celeba"), NAMES)
    with open(os.path.join(root, "celeba", "list_eval_partition.txt"), "w") as f:
        f.writelines(f"{n} {p}\n" for n, p in PARTITION.items())


def make_kaggle(root):
    write_jpegs(os.path.join(root, "img_align_celeba", "img_align_celeba"), NAMES)
    with open(os.path.join(root, "list_eval_partition.csv"), "w") as f:
        f.write("image_id,partition\n")
        f.writelines(f"{n},{p}\n" for n, p in PARTITION.items())


@pytest.mark.parametrize("make", [make_torchvision, make_kaggle])
def test_celeba_layouts_use_the_official_partition(tmp_path, make):
    make(str(tmp_path))
    for split in data.SPLITS:
        files = data.celeba_files(str(tmp_path), split)
        assert [os.path.basename(f) for f in files] == expected(split)
        assert all(os.path.isfile(f) for f in files)


def test_plain_celeba_folder_gets_a_stable_hash_split(tmp_path):
    names = [f"{i:06d}.jpg" for i in range(1, 61)]
    write_jpegs(str(tmp_path), names)
    splits = {s: [os.path.basename(f) for f in data.celeba_files(str(tmp_path), s)] for s in data.SPLITS}
    assert sorted(sum(splits.values(), [])) == names  # every image in exactly one split
    assert all(splits.values())  # 60 images: none of the splits is empty
    # adding images never moves an existing one to another split
    write_jpegs(str(tmp_path), [f"{i:06d}.jpg" for i in range(61, 200)])
    for s in data.SPLITS:
        grown = {os.path.basename(f) for f in data.celeba_files(str(tmp_path), s)}
        assert set(splits[s]) <= grown


def test_folder_dataset_is_recursive_and_takes_every_format(tmp_path):
    write_jpegs(str(tmp_path / "a"), ["x.jpg"])
    write_jpegs(str(tmp_path / "a" / "b"), ["y.png", "z.webp", "w.bmp"])
    (tmp_path / "notes.txt").write_text("not an image")
    found = data.list_images(str(tmp_path))
    assert sorted(os.path.basename(f) for f in found) == ["w.bmp", "x.jpg", "y.png", "z.webp"]


def test_links_are_followed_but_no_folder_is_listed_twice(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_jpegs(str(root / "a" / "b"), ["x.jpg", "y.jpg"])
    write_jpegs(str(outside), ["z.jpg"])
    os.symlink(outside, root / "linked")  # a folder kept elsewhere: its images count
    os.symlink(root, root / "a" / "loop")  # back to the top: one loop listed every image 41 times
    os.symlink(root / "a", root / "a" / "b" / "up")  # a second loop: the two together never ended
    os.symlink(root / "a" / "b", root / "b_again")  # the same folder by another way
    found = data.list_images(str(root))
    assert sorted(os.path.basename(f) for f in found) == ["x.jpg", "y.jpg", "z.jpg"]
    splits = [f for s in data.SPLITS for f in data.folder_files(str(root), s)]
    assert sorted(splits) == sorted(found)  # each image in one split only


def test_preprocessing_resizes_the_shorter_side_crops_the_centre_and_scales(tmp_path):
    im = Image.new("RGB", (178, 218), (255, 0, 51))  # CelebA's shape, lossless
    ImageDraw.Draw(im).rectangle([0, 0, 177, 9], fill=(0, 255, 255))  # bands that the centre crop must remove
    ImageDraw.Draw(im).rectangle([0, 208, 177, 217], fill=(0, 255, 255))
    im.save(tmp_path / "a.png")
    x, ok = data.ImageFiles([str(tmp_path / "a.png")], 32)[0]
    assert ok and x.shape == (3, 32, 32)
    # 178 x 218 -> 32 x 39 -> the middle 32 rows: no band left, and 0..255 mapped linearly onto -1..1
    expected = torch.tensor([1.0, -1.0, 51 / 127.5 - 1]).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def test_a_corrupt_jpeg_is_flagged_not_raised(tmp_path):
    good, bad = write_jpegs(str(tmp_path), ["good.jpg", "bad.jpg"])
    with open(bad, "r+b") as f:
        f.truncate(100)  # a download cut short
    ds = data.ImageFiles([good, bad], 32)
    assert ds[0][1] is True
    x, ok = ds[1]
    assert ok is False and torch.equal(x, torch.zeros(3, 32, 32))


def test_a_phone_photo_trains_upright(tmp_path):
    upright = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    phone = write_phone_photo(tmp_path / "phone.jpg", upright, 6, quality=95)
    with Image.open(phone) as im:
        stored = im.convert("RGB")
    stored.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "twin.png")  # the phone's pixels turned upright, losslessly
    stored.save(tmp_path / "sideways.png")  # the same pixels on their side, without the tag
    files = data.ImageFiles([phone, str(tmp_path / "twin.png"), str(tmp_path / "sideways.png")], 32)
    (x, ok), (twin, _), (sideways, _) = files[0], files[1], files[2]
    assert ok and torch.equal(x, twin) and not torch.allclose(sideways, twin, atol=0.1)


def test_heic_photos_without_pillow_heif_are_left_out_in_one_line(tmp_path, monkeypatch, capsys):
    root = tmp_path / "photos"
    write_jpegs(str(root), [f"{i:02d}.jpg" for i in range(20)])
    for i in range(3):
        (root / f"IMG_{i}.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    everything = lambda: [f for split in data.SPLITS for f in data.folder_files(str(root), split)]
    monkeypatch.setattr(data, "heif_readable", lambda: True)
    assert len(everything()) == 23 and capsys.readouterr().err == ""
    monkeypatch.setattr(data, "heif_readable", lambda: False)
    assert sorted(os.path.basename(f) for f in everything()) == [f"{i:02d}.jpg" for i in range(20)]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: 3 HEIC/HEIF photos under {root} are left out: reading them needs the pillow-heif package "
                   "(pip install pillow-heif)"]  # once, not once per split


def test_missing_celeba_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(UserError) as e:
        data.celeba_files(str(tmp_path / "nowhere"), "train")
    message = str(e.value)
    assert "nowhere" in message and "kaggle" in message.lower() and "--dataset synthetic" in message


def test_synthetic_faces_are_seeded():
    a, b = data.SyntheticFaces(4, 32, seed=0), data.SyntheticFaces(4, 32, seed=0)
    assert torch.equal(a[3][0], b[3][0])
    assert not torch.equal(a[3][0], a[2][0])
    assert not torch.equal(a[3][0], data.SyntheticFaces(4, 32, seed=1)[3][0])


# -----------------------------------------------------------------------------
# labelled data for the detector: split by group

def test_no_video_and_no_identity_lands_in_two_parts():
    items = [(f"/d/{c}/{name}_{k}.mp4", label, data.identities_of(f"{name}_{k}")) for name in "ABCDEFGHIJ" for k in range(3)
             for c, label in (("real", 0), ("fake", 1))]
    for seed in range(5):
        parts, names = data.split_by_group(items, valid=0.2, test=0.2, seed=seed)
        files = [f for part in parts.values() for f, _ in part]
        assert sorted(files) == sorted(f for f, _, _ in items)  # every file once
        owner = {}
        for part, chosen in parts.items():
            assert {label for _, label in chosen} == {0, 1}
            for f, _ in chosen:
                assert owner.setdefault(data.identities_of(f)[0], part) == part  # A_0, A_1, A_2 in one part
        assert set(names["test"]).isdisjoint(names["train"]) and set(names["valid"]).isdisjoint(names["train"])


def test_group_by_regex_and_default_stem():
    assert data.identities_of("x/Keanu_Reeves_0.mp4") == data.identities_of("y/Keanu_Reeves_1.mp4") == ["Keanu_Reeves"]
    assert data.identities_of("clip-07-take2.mp4", r"clip-(\d+)") == ["07"]
    assert data.identities_of("000_003.mp4", r"\d+") == ["000", "003"]  # FaceForensics++: target 000's frames, 003's face


def test_a_file_showing_two_identities_joins_their_groups():
    # FaceForensics++ names: a fake NNN_MMM shows the frames of NNN and the face of MMM
    items = [(f"/d/real/{i:03d}.mp4", 0) for i in range(10)] + [(f"/d/fake/{i:03d}_{(i + 1) % 10:03d}.mp4", 1) for i in range(0, 10, 2)]
    items = [(p, label, data.identities_of(p, r"\d+")) for p, label in items]
    parts, names = data.split_by_group(items, valid=0.2, test=0.2, seed=3)
    where = {}
    for part, chosen in parts.items():
        for path, _ in chosen:
            for ident in data.identities_of(path, r"\d+"):
                assert where.setdefault(ident, part) == part, f"{ident} is in {where[ident]} and {part}"


def test_too_few_identities_to_split_is_one_clear_error():
    items = [(p, label, data.identities_of(p)) for p, label in
             [("/d/real/A_0.mp4", 0), ("/d/fake/A_0.mp4", 1), ("/d/real/B_0.mp4", 0), ("/d/fake/B_0.mp4", 1)]]
    with pytest.raises(UserError, match="cannot split 2 groups"):
        data.split_by_group(items, valid=0.3, test=0.3)


def test_a_16_bit_greyscale_png_trains_as_its_shades_not_as_white(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    files = [str(tmp_path / "grey16.png")]
    image, ok = data.ImageFiles(files, 32)[0]
    assert ok and image.min() == -1 and image.max() == 1 and image.unique().numel() > 200
    cached = cache.load_or_build(files, 32, str(tmp_path / "cache"), "grey", workers=1)
    assert torch.equal(cached[0][0], image)  # the cache decodes it the same way
