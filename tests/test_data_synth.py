"""Synthetic generator, shards and their wds2idx index, caption tokenizer."""

import io
import json
import shutil
import tarfile

import pytest
from PIL import Image

from fineviti.data import shards, synth
from fineviti.data.dataset import ShardDataset
from fineviti.data.tokenizer import BOS_ID, EOS_ID, CaptionTokenizer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    synth.generate(out, images=30, seed=3, heldout=8, samples_per_shard=12, processes=1)
    return out


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def test_generator_is_byte_identical_for_a_seed(dataset, tmp_path):
    again = tmp_path / "b"
    synth.generate(again, images=30, seed=3, heldout=8, samples_per_shard=12, processes=2)
    names = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(again).as_posix() for p in again.rglob("*") if p.is_file())
    assert "train/shard-00002.tar" in names and "heldout/shard-00000.tar" in names
    for name in names:
        if name != "info.json":  # holds timings
            assert (dataset / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "c"
    synth.generate(other, images=30, seed=4, heldout=0, samples_per_shard=12, processes=1)
    assert (other / "train/shard-00000.tar").read_bytes() != (dataset / "train/shard-00000.tar").read_bytes()
    assert not (other / "heldout").exists()


def test_samples_follow_the_spec(dataset):
    tokenizer = CaptionTokenizer(dataset / "tokenizer.json")
    for split in ("train", "heldout"):
        files = {}
        for tar in shards.list_shards(dataset / split):
            files.update(_members(tar))
        keys = sorted({name.split(".")[0] for name in files})
        assert len(keys) == (30 if split == "train" else 8)
        for key in keys:
            meta = json.loads(files[f"{key}.json"])
            caption = files[f"{key}.txt"].decode()
            image = Image.open(io.BytesIO(files[f"{key}.jpg"]))
            assert image.format == "JPEG" and image.size == (meta["width"], meta["height"])
            w, h = image.size
            assert 64 <= min(w, h) and max(w, h) <= 1024 and max(w, h) / min(w, h) <= 4.01
            assert 50 <= len(caption.split()) <= 250
            ids, cut = tokenizer.encode_batch([caption])
            assert cut == 0 and len(ids[0]) <= 256
            assert 1 <= len(meta["regions"]) <= 8 and len(meta["regions"]) == len(meta["objects"])
            for region, obj in zip(meta["regions"], meta["objects"], strict=True):
                x0, y0, x1, y1 = region["bbox"]
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
                phrase = f"{obj['size']} {obj['colour']} {obj['shape']}"
                assert phrase in region["caption"] and phrase in caption and obj["position"] in caption
            if split == "heldout":
                negatives = meta["hard_negatives"]
                assert len(negatives) >= 4
                for negative in negatives:
                    assert negative["caption"] != caption
                    assert negative["kind"] in ("colour", "shape", "size", "position", "word")
            else:
                assert "hard_negatives" not in meta


def test_captions_name_only_the_words_that_are_drawn(dataset):
    """An object too small to carry a legible word carries none, in its metadata and its captions (about a sixth of
    the word-carrying objects were named with a word that was never drawn)."""
    ds = ShardDataset(dataset / "train")
    with_word = 0
    for i in range(len(ds)):
        raw = ds.load(i, 0)
        for obj, region in zip(raw.meta["objects"], raw.regions, strict=True):
            x0, y0, x1, y1 = region["bbox"]
            if obj["word"] is not None:
                with_word += 1
                assert min(x1 - x0, y1 - y0) >= synth.WORD_MIN_SIDE, (raw.key, obj, region)
                assert f'"{obj["word"]}"' in region["caption"]
            else:
                assert "with the word" not in region["caption"]
    assert with_word > 0


def test_regenerating_replaces_the_old_shards(tmp_path):
    """generate() into a folder that holds an earlier, larger data set: only the new samples are read (the old
    shards past the new ones' count used to stay and be read with them)."""
    synth.generate(tmp_path, images=25, seed=0, heldout=4, samples_per_shard=10, processes=1)
    synth.generate(tmp_path, images=12, seed=1, heldout=0, samples_per_shard=10, processes=1)
    assert len(ShardDataset(tmp_path / "train")) == 12
    assert sorted(p.name for p in (tmp_path / "train").glob("shard-*")) == [
        "shard-00000.idx", "shard-00000.tar", "shard-00001.idx", "shard-00001.tar"]
    assert not list((tmp_path / "heldout").glob("shard-*"))


def test_objects_are_drawn_where_their_boxes_say(dataset):
    files = _members(dataset / "train/shard-00000.tar")
    meta = json.loads(files["000000000.json"])
    image = Image.open(io.BytesIO(files["000000000.jpg"])).convert("RGB")
    for region, obj in zip(meta["regions"], meta["objects"], strict=True):
        x0, y0, x1, y1 = region["bbox"]
        if obj["shape"] in ("ring", "cross") or obj["word"] or min(x1 - x0, y1 - y0) < 8:
            continue  # hollow, covered by the word, or too small for JPEG to keep a clean centre
        centre = image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + (y1 - y0) // 6))
        expected = synth.COLOURS[obj["colour"]]
        assert max(abs(a - b) for a, b in zip(centre, expected, strict=True)) < 40, (obj, centre)


def test_index_matches_dalis_wds2idx_and_gives_random_access(dataset, tmp_path):
    tar = dataset / "train/shard-00001.tar"
    ours = shards.index_path(tar)
    wds2idx = pytest.importorskip("wds2idx")  # ships with nvidia-dali
    theirs = tmp_path / "theirs.idx"
    with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
        creator.create_index()
    assert ours.read_text() == theirs.read_text()
    samples = shards.read_index(ours)
    assert len(samples) == 12
    reader = shards.ShardReader([tar])
    files = _members(tar)
    for sample in samples[::-1]:
        for ext, member in sample.members.items():
            assert reader.read(0, member) == files[f"{sample.key}.{ext}"]
    reader.close()


def test_truncated_tar_is_indexed_up_to_its_last_whole_sample(dataset, tmp_path):
    tar = tmp_path / "cut.tar"
    data = (dataset / "train/shard-00000.tar").read_bytes()
    whole = shards.read_index(shards.index_path(dataset / "train/shard-00000.tar"))
    cut_at = whole[7].members["jpg"].offset + 100  # inside the 8th sample's image
    tar.write_bytes(data[:cut_at])
    idx, error = shards.write_index(tar)
    assert error is not None
    samples = shards.read_index(idx)
    assert [s.key for s in samples] == [s.key for s in whole[:7]]
    # an index written before the cut: reading past the end raises a clear error (the loader skips and counts)
    reader = shards.ShardReader([tar])
    with pytest.raises(EOFError, match="truncated"):
        reader.read(0, whole[9].members["json"])


def _tar(path, members, fmt=tarfile.USTAR_FORMAT, end=True):
    """A tar of (name, bytes) members (directories for names ending in /); end=False leaves out its end blocks."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        last = buffer.tell()
    data = buffer.getvalue()
    path.write_bytes(data if end else data[:last])
    return path


def _sample_members(keys):
    return [(f"{k}.{ext}", data) for k in keys for ext, data in (("jpg", b"j" * 700), ("txt", b"a caption"))]


def test_a_tar_cut_at_or_inside_a_header_is_damage(tmp_path):
    """tarfile stops without an error where a cut leaves no header or half of one: the samples after it were lost
    with nothing counted (18 of 55 cuts of a 10-sample tar in a review). A tar without its end-of-archive block is
    damaged wherever it stops."""
    whole = _tar(tmp_path / "whole.tar", _sample_members(f"{i:03d}" for i in range(4)))
    data = whole.read_bytes()
    samples, error = shards.scan_tar(whole)
    assert error is None and len(samples) == 4
    end = max(m.offset + m.size for m in samples[-1].members.values())
    end = -(-end // 512) * 512
    cut = tmp_path / "cut.tar"
    for at in [*range(512, end + 1, 512), *range(100, end, 512)]:
        cut.write_bytes(data[:at])
        samples, error = shards.scan_tar(cut)
        assert error is not None and len(samples) < 4, at
    cut.write_bytes(data[:end + 512])  # one end block: tarfile stops there, nothing lost
    assert shards.scan_tar(cut) == (shards.scan_tar(whole)[0], None)
    samples, error = shards.scan_tar(_tar(tmp_path / "no_end.tar", _sample_members(["a", "b"]), end=False))
    assert error.startswith("truncated: no end-of-archive block") and [s.key for s in samples] == ["a"]


def test_an_index_of_a_tar_cut_short_or_appended_to_does_not_match(tmp_path):
    """An index matched a tar when the members it lists were there: one written for a tar cut short still matched
    the tar fetched again whole, and one for a tar since appended to, so the samples after its last were hidden on
    every run. The tar must end after the index's last sample (members the scan leaves out aside)."""
    tar = tmp_path / "s.tar"
    _tar(tar, _sample_members(f"{i:03d}" for i in range(6)))
    data = tar.read_bytes()
    whole = shards.scan_tar(tar)[0]
    assert shards.index_matches(tar, whole)
    tar.write_bytes(data[:whole[3].members["jpg"].offset + 10])
    shards.write_index(tar)
    cut_index = shards.read_index(shards.index_path(tar))
    assert len(cut_index) == 3 and shards.index_matches(tar, cut_index) is False  # (damage: counted every scan)
    tar.write_bytes(data)
    assert shards.index_matches(tar, cut_index) is False
    ShardDataset(str(tar))  # (its images are not images: it keeps none, but reads the tar's samples again)
    rewritten = shards.read_index(shards.index_path(tar))
    assert len(rewritten) == 6 and shards.index_matches(tar, rewritten)
    _tar(tar, _sample_members(f"{i:03d}" for i in range(8)))  # appended to
    assert shards.index_matches(tar, whole) is False
    # members the scan leaves out after the last sample (a directory, a file without a key) are no new samples
    _tar(tar, [*_sample_members(["a", "b"]), ("extra/", b""), (".hidden", b"x")])
    assert shards.index_matches(tar, shards.scan_tar(tar)[0])
    empty = _tar(tmp_path / "empty.tar", [])
    assert shards.scan_tar(empty) == ([], None) and shards.index_matches(empty, [])


def test_extensions_are_lower_cased_as_webdataset_does(tmp_path):
    """000.JPG with 000.TXT: every sample was left out as missing its image."""
    tar = _tar(tmp_path / "upper.tar", [("000.JPG", b"j"), ("000.TXT", b"cap"), ("001.Jpg", b"j"), ("001.txt", b"c")])
    samples, error = shards.scan_tar(tar)
    assert error is None and [sorted(s.members) for s in samples] == [["jpg", "txt"], ["jpg", "txt"]]
    shards.write_index(tar)
    assert [sorted(s.members) for s in shards.read_index(shards.index_path(tar))] == [["jpg", "txt"]] * 2
    idx = shards.index_path(tar)  # an index from elsewhere keeps the case
    idx.write_text(idx.read_text().replace("jpg ", "JPG ", 1))
    assert sorted(shards.read_index(idx)[0].members) == ["jpg", "txt"]


def test_shards_with_dots_in_their_names_have_an_index_each(tmp_path):
    assert shards.index_path(tmp_path / "coyo.v1-00000.tar") == tmp_path / "coyo.v1-00000.idx"
    assert shards.index_path(tmp_path / "shard-00003.tar") == tmp_path / "shard-00003.idx"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "pax"])
def test_member_names_with_spaces_percent_signs_or_non_ascii_keep_their_index(tmp_path, fmt):
    """A name with a space broke the index's fields, and a PAX tar's non-ASCII name never matched its header: both
    made every run scan the shard again."""
    keys = ["a b", "c%41d", "e\u00a0f", "g\u3000h", "\u00fcber" if fmt == tarfile.PAX_FORMAT else "plain"]
    tar = _tar(tmp_path / "names.tar", _sample_members(keys), fmt=fmt)
    idx, error = shards.write_index(tar)
    assert error is None
    indexed = shards.read_index(idx)
    assert [s.key for s in indexed] == keys and indexed[0].members["jpg"].name == "a b.jpg"
    assert shards.index_matches(tar, indexed)


def test_a_file_that_is_not_a_tar_is_refused_as_a_data_set(tmp_path):
    """data.path=tokenizer.json was read as a damaged shard (counted truncated_shard) and got a stray index."""
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer.json is a file but not a .tar shard"):
        shards.list_shards(tmp_path / "tokenizer.json")
    assert not list(tmp_path.glob("*.idx"))


def test_writer_rejects_keys_with_dots(tmp_path):
    with shards.ShardWriter(tmp_path) as writer, pytest.raises(ValueError, match="key"):
        writer.write("a.b", [("txt", b"x")])


def test_read_index_rejects_other_formats(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_text("v9 1\njpg 0 1 a.jpg\n")
    with pytest.raises(ValueError, match="v1.2"):
        shards.read_index(bad)


def test_caption_text_that_spells_a_special_token_is_text(dataset):
    """Hugging Face tokenizers match added tokens inside the text: 'a cat <eos> on a mat' had <eos> (id 2) in the
    middle, and '<image>' in a caption faked a stage-2 placeholder. Only the ends are special now."""
    tok = CaptionTokenizer(dataset / "tokenizer.json")
    (ids,), _ = tok.encode_batch(["a cat <eos> on a mat <image> <pad><bos>"])
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert not set(ids[1:-1]) & {0, 1, 2, 3}
    assert tok.decode(ids) == "a cat <eos> on a mat <image> <pad><bos>"


def test_tokenizer_truncation_keeps_the_first_tokens_and_counts_the_cut(dataset):
    tokenizer = CaptionTokenizer(dataset / "tokenizer.json")
    text = (dataset / "train").glob("*.tar").__next__()
    caption = next(v for k, v in _members(text).items() if k.endswith(".txt")).decode()
    (full,), cut = tokenizer.encode_batch([caption], max_length=None)
    assert cut == 0 and full[0] == BOS_ID and full[-1] == EOS_ID
    (short,), cut = tokenizer.encode_batch([caption], max_length=10)
    assert short == full[:9] + [EOS_ID] and cut == len(full) - 10
    assert tokenizer.decode(full) == caption
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode_batch([caption], max_length=1)


def test_cli_data_synth(tmp_path, capsys):
    from fineviti import cli

    assert cli.main(["data", "synth", "--out", str(tmp_path / "d"), "--images", "5", "--seed", "1",
                     "--heldout", "2", "--processes", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 5 and info["heldout"] == 2
    assert (tmp_path / "d/tokenizer.json").is_file()
    shutil.rmtree(tmp_path / "d")


def test_generate_refuses_a_folder_it_did_not_write(tmp_path):
    """generate replaces train/, heldout/, tokenizer.json and info.json: over someone's folder it refused nothing
    (their tokenizer.json was replaced); over its own set, or one it was cut short writing, it goes ahead."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a synthetic data set of this generator"):
        synth.generate(mine, 2, heldout=0, processes=1)
    assert (mine / "tokenizer.json").read_text() == "{}"
    with pytest.raises(NotADirectoryError):
        synth.generate(mine / "tokenizer.json", 2, heldout=0, processes=1)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / synth._MARK).write_text("")  # cut short before its info.json
    (ours / "train").mkdir()
    assert synth.generate(ours, 2, heldout=0, processes=1)["images"] == 2
    assert synth.generate(ours, 3, heldout=0, processes=1)["images"] == 3  # again over its own set
    # an older version's generation cut short (shards only, no marker), with a desktop's litter: accepted
    older = tmp_path / "older"
    shutil.copytree(ours / "train", older / "train")
    (older / ".DS_Store").write_bytes(b"")
    assert synth.generate(older, 2, heldout=0, processes=1)["images"] == 2


def test_indexes_and_exports_get_the_mode_of_a_new_file(dataset, tmp_path):
    """An index (written under a temporary name from tempfile.mkstemp, then renamed) and an export's .safetensors
    (safetensors' writer) were 0600 whatever the umask: other users of a shared data set or export could not read
    them. They get what open() would give, 0644 under the usual umask 022."""
    import os
    import stat

    import torch

    from fineviti._files import new_file_mode
    from fineviti.train.export import export_model

    old = os.umask(0o022)
    try:
        assert new_file_mode() == 0o644
        tar = tmp_path / "copy.tar"
        shutil.copyfile(dataset / "train/shard-00000.tar", tar)
        idx, _ = shards.write_index(tar)
        out = export_model(torch.nn.Linear(2, 2), tmp_path / "x.safetensors", part="full")
        for path in (idx, out, out.with_suffix(".safetensors.json")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
        os.umask(0o077)
        assert new_file_mode() == 0o600
    finally:
        os.umask(old)
