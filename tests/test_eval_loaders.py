"""Each benchmark loader on a tiny fixture written in that benchmark's layout."""

import json
from pathlib import Path

import pytest
from PIL import Image

from fineviti.eval import loaders
from tests import fixtures_eval as fx


def _colour_of(path) -> str:
    with Image.open(path) as image:
        rgb = image.convert("RGB").getpixel((0, 0))
    return min(fx.COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(fx.COLOURS[c], rgb, strict=True)))


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_karpathy_split(tmp_path, dataset):
    path = fx.build_karpathy(tmp_path, dataset)
    test = loaders.karpathy_captions(path, tmp_path, "test")
    assert test.kind == "retrieval" and len(test) == 4 and test.name == f"{dataset}_test"
    for record, colour in zip(test.records, ["red", "green", "blue", "yellow"], strict=True):
        image, captions, _key = record  # records unpack as tuples
        assert captions == [f"A {colour} picture.", f"mostly {colour}"]
        assert Path(image).is_file() and _colour_of(image) == colour
    if dataset == "coco":
        assert Path(test.records[0].image).parent.name == "val2014"
    else:
        assert Path(test.records[0].image).parent.name == "flickr30k-images"
    assert len(loaders.karpathy_captions(path, tmp_path, "train")) == 2
    with pytest.raises(ValueError, match=r"no image has split 'val'.*\['test', 'train'\]"):
        loaders.karpathy_captions(path, tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="images\\[0\\] not found"):
        loaders.karpathy_captions(path, tmp_path / "elsewhere", "test")


def test_image_folder_with_and_without_a_mapping(tmp_path):
    root, mapping = fx.build_image_folder(tmp_path)
    plain = loaders.image_folder(root)
    assert plain.kind == "zero_shot"
    assert plain.classnames == ["n00000001", "n00000002", "n00000003"]  # sorted folders, as ImageFolder
    assert [r.label for r in plain.records] == [0, 0, 1, 1, 2, 2]  # notes.txt is not an image
    assert [_colour_of(r.image) for r in plain.records] == ["red", "red", "green", "green", "blue", "blue"]
    named = loaders.image_folder(root, mapping)
    assert named.classnames == ["red", "green", "blue"]  # first synonym of "red, red thing"
    assert loaders.image_folder(root, mapping, first_synonym=False).classnames[0] == "red, red thing"
    as_json = tmp_path / "imagenet_class_index.json"
    as_json.write_text(json.dumps({"0": ["n00000001", "tench"], "1": ["n00000002", "goldfish"],
                                   "2": ["n00000003", "great_white_shark"]}))
    assert loaders.image_folder(root, as_json).classnames == ["tench", "goldfish", "great white shark"]
    as_json.write_text(json.dumps({"n00000001": "tench"}))
    with pytest.raises(ValueError, match="'n00000002' is missing from the mapping"):
        loaders.image_folder(root, as_json)


def test_image_folder_tells_classes_with_one_first_synonym_apart(tmp_path):
    """ImageNet's mapping names two classes "maillot" ("maillot" and "maillot, tank suit") and two "crane": a shared
    first synonym keeps its whole list where that tells them apart, and identical names are reported (a warning
    and info["duplicate_class_names"]): their images tie at top-1 and never count as correct."""
    root, _ = fx.build_image_folder(tmp_path)
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n00000001 maillot\nn00000002 maillot, tank suit\nn00000003 tench, Tinca tinca\n")
    assert loaders.image_folder(root, mapping).classnames == ["maillot", "maillot, tank suit", "tench"]
    mapping.write_text("n00000001 crane\nn00000002 crane\nn00000003 tench, Tinca tinca\n")
    with pytest.warns(UserWarning, match="classes with the same name"):
        same = loaders.image_folder(root, mapping)
    assert same.classnames == ["crane", "crane", "tench"]
    assert same.info["duplicate_class_names"] == {"crane": ["n00000001", "n00000002"]}


def test_urban1k(tmp_path):
    root = fx.build_urban1k(tmp_path)
    data = loaders.urban1k(root)
    assert [r.captions for r in data.records] == [[f"A long {c} caption about the photo."]
                                                  for c in ("red", "green", "blue")]
    assert [_colour_of(r.image) for r in data.records] == ["red", "green", "blue"]
    (root / "caption" / "9.txt").write_text("orphan")
    with pytest.raises(FileNotFoundError, match="9.txt has no image"):
        loaders.urban1k(root)


def test_dci(tmp_path):
    root = fx.build_dci(tmp_path)
    everything = loaders.dci(root)  # the parent of densely_captioned_images works too
    assert everything.name == "dci_all" and len(everything) == 3
    assert everything.records[0].captions == ["A red picture.\nIt is mostly red."]
    assert _colour_of(everything.records[2].image) == "blue"
    test = loaders.dci(root / "densely_captioned_images", split="test", caption="short")
    assert [r.captions for r in test.records] == [["A blue picture."]]
    with pytest.raises(ValueError, match="split 'dev' is not in"):
        loaders.dci(root, split="dev")


def test_docci(tmp_path):
    root = fx.build_docci(tmp_path)
    test = loaders.docci(root)
    assert [r.key for r in test.records] == ["test_00000", "test_00002"]
    assert [r.captions for r in test.records] == [["A red photo."], ["A blue photo."]]
    assert [_colour_of(r.image) for r in test.records] == ["red", "blue"]
    assert len(loaders.docci(root, "qual_dev")) == 1
    with pytest.raises(ValueError, match="no row has split 'val'"):
        loaders.docci(root, "val")


def test_coco_instances(tmp_path):
    path = fx.build_coco_instances(tmp_path)
    data = loaders.coco_instances(path, tmp_path)
    assert data.kind == "regions" and data.classnames == ["red", "green", "blue"]
    assert [r.key for r in data.records] == ["3", "7"]  # image 9 has no boxes
    assert data.records[1].boxes == [(0, 0, 32, 24), (32, 24, 64, 48)]  # [x, y, w, h] -> x0, y0, x1, y1
    assert data.records[1].labels == [0, 2]
    assert data.records[0].boxes == [(4, 4, 24, 24)] and data.info["dropped_boxes"] == 1  # the 0.5 px wide box
    no_crowd = loaders.coco_instances(path, tmp_path, skip_crowd=True)
    assert no_crowd.records[1].labels == [0] and no_crowd.info["dropped_boxes"] == 2


def test_shards(tmp_path):
    root = fx.build_shards(tmp_path / "heldout")
    captions = loaders.shard_captions(root)
    assert len(captions) == 6
    assert captions.records[0].captions == ["red green"]
    assert captions.records[5].captions == ["magenta red", "magenta then red"]  # json "captions": all of them
    assert isinstance(captions.records[0].image.read(), bytes)
    negatives = loaders.shard_hard_negatives(root)
    assert negatives.records[1][1:3] == ("green blue", ["blue green"])
    regions = loaders.shard_regions(root)  # classes from json "objects": "colour shape"
    assert regions.classnames == sorted(f"{c} square" for c in list(fx.COLOURS)[:6])
    assert regions.records[0].boxes == [(0.0, 0.0, 28.0, 28.0), (28.0, 0.0, 56.0, 28.0)]
    assert [regions.classnames[k] for k in regions.records[0].labels] == ["red square", "green square"]
    with pytest.raises(ValueError, match="sample 000000000 has a region of class 'green square'"):
        loaders.shard_regions(root, classnames=loaders.synthetic_region_classes()[:3])
    by_caption = loaders.shard_regions(root, label_of=lambda region, meta, j: region["caption"])
    assert by_caption.classnames[:2] == ["a blue square", "a cyan square"]
    names = [by_caption.classnames[k] for k in by_caption.records[0].labels]
    assert names == ["a red square", "a green square"]


def test_a_dropped_shard_set_closes_its_files(tmp_path):
    """The shard reader keeps its tar files open for the eval set's lazily read images; dropping the set closes
    them (they were left to the garbage collector, one ResourceWarning per tar at exit)."""
    import gc
    import warnings

    root = fx.build_shards(tmp_path / "heldout")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captions = loaders.shard_captions(root)
        assert all(isinstance(r.image.read(), bytes) for r in captions.records)
        reader = captions.records[0].image.dataset.reader
        files = list(reader._files.values())
        assert files and not any(f.closed for f in files)
        del captions, reader
        gc.collect()
    assert all(f.closed for f in files)
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def build_shards_with_bad_samples(root: Path, *, truncate: bool = False) -> Path:
    """fx.build_shards' first four samples, and a second shard "bad-00000.tar" with three samples the shard reader
    counts in its stats: one without a caption and one whose image header does not parse (both left out), and one
    with broken json (kept, without its regions and hard negatives). truncate: a third shard "cut-00000.tar" of two
    good samples, cut inside the second one's image."""
    import io

    from fineviti.data.shards import ShardWriter, scan_tar

    fx.build_shards(root, n=4)
    buffer = io.BytesIO()
    fx.blocks((56, 28), [((0, 0, 56, 28), "blue")]).save(buffer, "PNG")
    png = buffer.getvalue()
    with ShardWriter(root, prefix="bad", samples_per_shard=10) as writer:
        writer.write("bad_caption", [("png", png)])
        writer.write("bad_header", [("png", b"not an image"), ("txt", b"blue blue")])
        writer.write("bad_json", [("png", png), ("txt", b"blue blue"), ("json", b'{"regions": [')])
    if truncate:
        with ShardWriter(root, prefix="cut", samples_per_shard=10) as writer:
            for key in ("cut_whole", "cut_short"):
                writer.write(key, [("png", png), ("txt", b"blue blue")])
        tar = root / "cut-00000.tar"
        last = scan_tar(tar)[0][-1].members["png"]
        with open(tar, "r+b") as f:
            f.truncate(last.offset + last.size // 2)
    return root


def test_shard_loaders_report_the_samples_the_reader_skipped(tmp_path):
    """The shard reader leaves out samples without a caption or with an unreadable image header, and keeps a sample
    with broken json without its json: every shard set says so in info["skipped"] and a warning (its n used to
    shrink silently, and the broken json's sample to vanish from the region and hard-negative sets)."""
    root = build_shards_with_bad_samples(tmp_path / "heldout")
    skipped = {"bad_json": 1, "missing_caption": 1, "unreadable_header": 1}
    with pytest.warns(UserWarning, match=r"kept 5 samples and counted \{'bad_json': 1, 'missing_caption': 1, "
                                         r"'unreadable_header': 1\}"):
        captions = loaders.shard_captions(root)
    assert [r.key for r in captions.records] == ["bad_json", *(f"{i:09d}" for i in range(4))]
    assert captions.info["skipped"] == skipped and captions.info["samples"] == 5
    with pytest.warns(UserWarning, match="without its json"):
        negatives = loaders.shard_hard_negatives(root)
    assert len(negatives) == 4 and negatives.info["skipped"] == skipped and negatives.info["without_negatives"] == 1
    with pytest.warns(UserWarning, match="info\\['skipped'\\]"):
        regions = loaders.shard_regions(root)
    assert len(regions) == 4 and regions.info["skipped"] == skipped and regions.info["without_regions"] == 1


def test_image_folder_walks_class_folders_recursively(tmp_path):
    """As torchvision's ImageFolder: a class's images at any depth (a folder's files, sorted, before its subfolders';
    links followed), and a class folder without one is an error (only the top level used to be read, and an empty
    class kept a label)."""
    root = tmp_path / "images"
    for path in ("cat/b.png", "cat/a/z.png", "cat/a/y.JPEG", "dog/batch2/0.png", "dog/batch1/0.png",
                 "dog/batch1/deep/1.png"):
        fx.solid(root / path, "red" if path.startswith("cat") else "green", size=(8, 8))
    (root / "dog" / "batch1" / "notes.txt").write_text("not an image")
    data = loaders.image_folder(root)
    keys = ["cat/b", "cat/a/y", "cat/a/z", "dog/batch1/0", "dog/batch1/deep/1", "dog/batch2/0"]
    assert [r.key for r in data.records] == keys and [r.label for r in data.records] == [0, 0, 0, 1, 1, 1]
    try:
        from torchvision.datasets import ImageFolder
    except ImportError:
        ImageFolder = None  # noqa: N806
    if ImageFolder is not None:
        assert [(r.image, r.label) for r in data.records] == ImageFolder(str(root)).samples
    (root / "dog" / "batch1" / "loop").symlink_to(root / "dog", target_is_directory=True)
    assert [r.key for r in loaders.image_folder(root).records] == keys  # a link back up is not walked again
    (root / "empty_class" / "sub").mkdir(parents=True)
    (root / "empty_class" / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"1 of 3 class folders \('empty_class'\) hold no image with extensions"):
        loaders.image_folder(root)
