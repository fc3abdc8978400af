"""Pixels, batch assembly and the packed loader: patch layout, resume with prefetch and workers, bad data."""

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fineviti.data import synth
from fineviti.data.loader import DataConfig, PackedLoader
from fineviti.data.pixels import NORMS, normalise, patchify
from fineviti.data.positions import build_positions_ref
from fineviti.data.shards import ShardWriter, index_path, read_index


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader")
    synth.generate(out, images=36, seed=11, heldout=0, samples_per_shard=10, processes=1)
    return out


def config(data, **kwargs):
    base = dict(path=str(data / "train"), token_budget=2048, max_pixels=112 * 112 * 4, window=8, cost_block=4,
                seed=7)
    base.update(kwargs)
    return DataConfig(**base)


def fingerprint(batch):
    """Every field of a batch as bytes/values, for byte-identity checks."""
    out = []
    for name, value in vars(batch).items():
        out.append((name, value.numpy().tobytes() if isinstance(value, torch.Tensor) else value))
    return out


@pytest.mark.parametrize("merge", [1, 2])
def test_patchify_puts_the_crop_at_pos_in_each_patch(merge):
    p = 4
    image = torch.randint(0, 256, (3, p * 2 * merge * 3, p * 2 * merge * 2), dtype=torch.uint8)
    patches = patchify(image, p, merge)
    grid = torch.tensor([[image.shape[1] // p, image.shape[2] // p]], dtype=torch.int32)
    _, pos = build_positions_ref(grid, merge)
    assert patches.shape == (grid.prod().item(), 3 * p * p)
    for t, (r, c) in enumerate(pos.tolist()):
        crop = image[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)  # channel, row, column
        assert torch.equal(patches[t], crop)


@pytest.mark.parametrize("merge", [1, 2])
def test_batch_patches_hold_the_resized_image_crops(data, merge):
    cfg = config(data, merge=merge, epochs=1)
    loader = PackedLoader(cfg)
    batch = next(iter(loader))
    loader.close()
    p = cfg.patch
    assert batch.patches.dtype == torch.float32 and batch.patches.shape == (batch.cu_seqlens[-1], 3 * p * p)
    lookup = {key: i for i, key in enumerate(loader.dataset.keys)}
    mean, std = (torch.tensor(v) for v in NORMS["siglip"])
    for image, key in enumerate(batch.keys):
        i = lookup[key]
        target_h, target_w = (int(v) for v in loader.targets[:, i])
        rows, cols = batch.grid_hw[image].tolist()
        assert (rows * p, cols * p) == (target_h, target_w) and rows % merge == 0 and cols % merge == 0
        raw = loader.dataset.load(i)
        resized = Image.open(io.BytesIO(raw.image)).convert("RGB").resize((target_w, target_h), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized).copy()).float() / 255
        pixels = (pixels - mean) / std
        start, end = batch.cu_seqlens[image].item(), batch.cu_seqlens[image + 1].item()
        for t in range(start, end):
            r, c = batch.pos[t].tolist()
            crop = pixels[r * p:(r + 1) * p, c * p:(c + 1) * p, :].permute(2, 0, 1).reshape(-1)
            torch.testing.assert_close(batch.patches[t], crop, atol=1e-6, rtol=0)
        # boxes: scaled from the json's pixels to the patch grid (columns and rows of p pixels of the resized image)
        scale = torch.tensor([cols / raw.width, rows / raw.height] * 2)
        expected = torch.tensor([r["bbox"] for r in raw.regions], dtype=torch.float32) * scale
        torch.testing.assert_close(batch.boxes[batch.box_image == image], expected)
    assert batch.text_cu_seqlens.tolist()[-1] == batch.tokens.numel() and batch.n_texts == batch.n_images
    assert batch.region_cu_seqlens[-1] == batch.region_tokens.numel()
    assert batch.region_cu_seqlens.numel() == batch.boxes.shape[0] + 1


def test_normalise_clip_and_dtype():
    patches = torch.randint(0, 256, (5, 3 * 4), dtype=torch.uint8)
    out = normalise(patches, 2, "clip", torch.bfloat16)
    mean, std = (torch.tensor(v).repeat_interleave(4) for v in NORMS["clip"])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (patches / 255 - mean) / std, atol=2e-2, rtol=1e-2)


def test_budget_respected_and_static_shapes(data):
    loader = PackedLoader(config(data, epochs=1, pad_to_budget=True))
    keys = []
    for batch in loader:
        assert batch.patches.shape[0] == 2048 and batch.pos.shape[0] == 2048
        assert batch.cu_seqlens[-1] + batch.padding_tokens == 2048
        assert batch.patches[batch.cu_seqlens[-1]:].abs().sum() == 0
        keys += batch.keys
    assert len(keys) == len(set(keys)) and len(keys) <= 36


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_k_consumed_batches_is_byte_identical(data, workers):
    cfg = config(data, num_workers=workers, prefetch=2)
    loader = PackedLoader(cfg)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()  # prefetching has run ahead; the state must not include that
    assert state["planner"]["step"] == 3
    expected = [fingerprint(next(it)) for _ in range(4)]
    loader.close()
    resumed = PackedLoader(cfg)
    resumed.load_state_dict(state)
    got = [fingerprint(b) for b, _ in zip(resumed, range(4), strict=False)]
    resumed.close()
    assert got == expected
    # and the same batches with the other kind of prefetch
    other = PackedLoader(config(data, num_workers=2 - workers, prefetch=1))
    other.load_state_dict(state)
    assert [fingerprint(b) for b, _ in zip(other, range(4), strict=False)] == expected
    other.close()


def test_manual_consume_counts_only_what_the_trainer_consumed(data):
    loader = PackedLoader(config(data), manual_consume=True)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    loader.mark_consumed(batches[0].to("cpu"))
    assert loader.state_dict()["planner"]["step"] == 1
    with pytest.raises(ValueError, match="order"):
        loader.mark_consumed(batches[2])
    state = loader.state_dict()
    loader.close()
    resumed = PackedLoader(config(data), manual_consume=True)
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    assert fingerprint(again) == fingerprint(batches[1])
    resumed.close()
    with pytest.raises(RuntimeError, match="no batch"):
        resumed.mark_consumed()


@pytest.mark.parametrize("manual", [True, False])
def test_skip_counts_saved_before_a_batch_is_consumed_count_it_once_after_resume(data, tmp_path, manual):
    """A batch's skip counters join the stats when it is consumed, as the position does: saved between receiving a
    batch and mark_consumed (as the trainer saves), they were in the saved stats, and the batch, replayed after the
    resume, added them again (undecodable_image 5 where an uninterrupted run counts 4)."""
    folder = tmp_path / "halfbad"
    meta = json.dumps({"width": 112, "height": 112}).encode()
    with ShardWriter(folder, samples_per_shard=100) as writer:
        for i in range(8):
            image = _jpeg(112, 112) if i % 2 else b"\xff\xd8\xff" + bytes(300)  # every other one undecodable
            writer.write(f"{i:06d}", [("jpg", image), ("txt", b"a caption"), ("json", meta)])
    (folder / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
    cfg = lambda: DataConfig(path=str(folder), token_budget=128, epochs=1, seed=0,  # noqa: E731
                             min_pixels=56 * 56, max_pixels=112 * 112)
    uninterrupted = PackedLoader(cfg())
    assert len(list(uninterrupted)) >= 3 and uninterrupted.stats["undecodable_image"] == 4
    first = PackedLoader(cfg(), manual_consume=manual)
    it = iter(first)
    for k in range(3):
        batch = next(it)
        if manual and k < 2:
            before, pending = Counter(first.stats), first.pending_stats()
            first.mark_consumed(batch)
            assert first.stats == before + pending and not first.pending_stats()  # (what data_skipped counts)
    state = first.state_dict()  # manual: after receiving the third batch, before stepping on it
    first.close()
    resumed = PackedLoader(cfg(), manual_consume=manual)
    resumed.load_state_dict(state)
    for batch in resumed:
        if manual:
            resumed.mark_consumed(batch)
    assert resumed.stats == uninterrupted.stats


def test_resume_on_two_ranks_from_one_keeps_every_sample_once(data):
    single = PackedLoader(config(data))
    seen = []
    it = iter(single)
    for _ in range(4):
        seen.append(next(it).keys)
    state = single.state_dict()
    single.close()
    n_packs = single.planner.epoch(0).n_packs
    ranks = [PackedLoader(config(data), rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    iters = [iter(loader) for loader in ranks]
    while len(seen) < n_packs:
        seen += [next(i).keys for i in iters]
    epoch0 = [k for keys in seen[:n_packs] for k in keys]
    assert sorted(epoch0) == sorted(single.dataset.keys)
    assert ranks[0].state_dict()["planner"] == ranks[1].state_dict()["planner"]
    for loader in ranks:
        loader.close()


def test_an_epoch_limited_stream_trains_every_sample_on_two_ranks(data):
    """The last step of an `epochs` run splits the pack left over (fewer than the ranks) so that each rank has
    some: every sample once, every rank the same number of steps, as many as steps_left() said."""
    ranks = [PackedLoader(config(data, epochs=1), rank=r, world_size=2) for r in range(2)]
    assert ranks[0].planner.epoch(0).n_packs % 2  # (the case under test: a remainder)
    expected = ranks[0].steps_left()
    assert expected == -(-ranks[0].planner.epoch(0).n_packs // 2) and ranks[0].left_out() == 0
    keys = [[b.keys for b in loader] for loader in ranks]
    assert [len(k) for k in keys] == [expected] * 2
    assert all(batch for k in keys for batch in k)  # no rank has an empty step
    seen = [key for k in keys for batch in k for key in batch]
    assert sorted(seen) == sorted(ranks[0].dataset.keys)
    assert all(loader.steps_left() == 0 and loader.state.epoch == 1 for loader in ranks)
    for loader in ranks:
        loader.close()


def test_seed_mismatch_is_refused(data):
    loader = PackedLoader(config(data))
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict({"planner": {"seed": 1, "epoch": 0, "pack": 0, "step": 0}})


def test_resume_under_another_plan_is_refused(data):
    """A position saved under one token budget (or data set, or window) means other packs under another: resuming
    it lost 9 samples and repeated 13 in an epoch, silently. The state carries what it was planned with."""
    state = PackedLoader(config(data)).state_dict()
    with pytest.raises(ValueError, match=r"another plan \(token_budget: saved 2048, now 3072\)"):
        PackedLoader(config(data, token_budget=3072)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"another plan \(lengths_crc32: saved \d+, now \d+\)"):
        PackedLoader(config(data, max_pixels=64 * 64 * 4)).load_state_dict(state)
    PackedLoader(config(data)).load_state_dict(state)  # the same plan
    old = {k: v for k, v in state.items() if k != "plan"}  # saved before the fingerprint: taken as it is
    PackedLoader(config(data)).load_state_dict(old)


def _jpeg(w, h, colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_bad_data_is_skipped_and_counted(data, tmp_path):
    folder = tmp_path / "bad"
    meta = lambda w, h, **kw: json.dumps({"width": w, "height": h, **kw}).encode()  # noqa: E731
    good_regions = [{"bbox": [2, 2, 30, 30], "caption": "a red square"}]
    with ShardWriter(folder, samples_per_shard=100) as writer:
        writer.write("good0", [("jpg", _jpeg(64, 64)), ("txt", b"a red picture"), ("json", meta(64, 64,
                                                                                              regions=good_regions))])
        writer.write("corrupt", [("jpg", b"\xff\xd8\xff" + bytes(500)), ("txt", b"x"), ("json", meta(64, 64))])
        writer.write("nocaption", [("jpg", _jpeg(64, 64)), ("json", meta(64, 64))])
        writer.write("noheader", [("jpg", b"garbage"), ("txt", b"y"), ("json", b"{}")])
        writer.write("badjson", [("jpg", _jpeg(70, 64)), ("txt", b"json is broken"), ("json", b"{nope")])
        writer.write("badbox", [("jpg", _jpeg(64, 64)), ("txt", b"boxes"), ("json", meta(64, 64, regions=[
            {"bbox": [0, 0, 100, 20], "caption": "outside"}, {"bbox": [10, 10, 5, 20], "caption": "inverted"},
            {"bbox": [1, 1, 9, 9], "caption": "fine"}, {"bbox": [1, 2], "caption": "short"}]))])
        writer.write("liar", [("jpg", _jpeg(96, 64)), ("txt", b"the json says 64 x 64"), ("json", meta(64, 64))])
        writer.write("noimage", [("txt", b"no image at all")])
    # a second shard cut short in its last sample, its index written before the cut
    with ShardWriter(folder, prefix="zcut", samples_per_shard=100) as writer:
        for i in range(3):
            writer.write(f"cut{i}", [("jpg", _jpeg(64, 64)), ("txt", b"z"), ("json", meta(64, 64))])
    tar = folder / "zcut-00000.tar"
    last = read_index(index_path(tar))[-1]
    tar.write_bytes(tar.read_bytes()[:last.members["json"].offset + 10])
    cut_again = folder / "zcut2-00000.tar"  # a copy with no index: indexed up to its last whole sample
    cut_again.write_bytes(tar.read_bytes())
    (folder / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
    loader = PackedLoader(DataConfig(path=str(folder), token_budget=4096, epochs=1, seed=0))
    batches = list(loader)
    keys = sorted(k for b in batches for k in b.keys)
    assert keys == ["badbox", "badjson", "cut0", "cut0", "cut1", "cut1", "good0", "liar"]
    stats = loader.stats
    assert stats["missing_caption"] == 1 and stats["unreadable_header"] == 1 and stats["missing_image"] == 1
    assert stats["undecodable_image"] == 1 and stats["bad_json"] == 1 and stats["truncated_shard"] == 2
    assert stats["bad_box"] == 3 and stats["size_mismatch"] == 1
    boxes = {b.keys[i]: b.boxes[b.box_image == i] for b in batches for i in range(b.n_images)}
    assert boxes["badbox"].shape == (1, 4) and boxes["good0"].shape == (1, 4) and boxes["badjson"].shape == (0, 4)
    # the liar's image decodes at 96 x 64 and is resized to the planned 64 x 64 grid (56 x 56 after rounding)
    assert "skipped or repaired" in loader.summary() and "undecodable_image 1" in loader.summary()
    assert json.loads(loader.state_dict()["stats_rank0"])["bad_box"] == 3


def test_a_pack_of_only_bad_images_gives_an_empty_batch(data, tmp_path):
    folder = tmp_path / "allbad"
    with ShardWriter(folder) as writer:
        writer.write("corrupt", [("jpg", b"\xff\xd8\xff" + bytes(500)), ("txt", b"x"),
                                 ("json", json.dumps({"width": 64, "height": 64}).encode())])
    (folder / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
    loader = PackedLoader(DataConfig(path=str(folder), token_budget=4096, epochs=1))
    (batch,) = list(loader)
    assert batch.n_images == 0 and batch.patches.shape == (0, 588) and batch.tokens.numel() == 0
    assert loader.stats["empty_pack"] == 1 and loader.stats["undecodable_image"] == 1


def test_bad_config_is_refused(data):
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(config(data), rank=2, world_size=2)
    with pytest.raises(ValueError, match="pixel_path"):
        PackedLoader(config(data, pixel_path="opencv"))
    for field, value, expected in (("window", 0, ">= 1"), ("seed", -1, ">= 0"), ("prefetch", 0, ">= 1"),
                                   ("num_workers", -1, ">= 0"), ("epochs", 0, ">= 1 or None"),
                                   ("token_budget", 1.5, ">= 1"), ("max_aspect", 0.5, ">= 1")):
        with pytest.raises(ValueError, match=rf"DataConfig\.{field} must be .*{expected}.*got {value}"):
            PackedLoader(config(data, **{field: value}))


def test_gpu_decoding_stays_out_of_forked_workers(data, monkeypatch):
    """DataLoader workers are forked: CUDA cannot start there (nvJPEG and DALI's mixed decoder raised at the first
    batch of a GPU preset, whose 4 workers resolved pixel_path auto to a CUDA decoder: is_available answers what the
    parent saw). A GPU path with workers is refused; auto decodes with PIL inside a worker."""
    from fineviti.data import loader as loader_mod
    from fineviti.data.pixels import PilPath

    for path, device in (("nvjpeg", None), ("nvjpeg", "cuda:1"), ("dali", "cuda")):
        with pytest.raises(ValueError, match=rf"DataConfig\.pixel_path='{path}' decodes on the GPU.*its 2 DataLoader "
                                             r"workers .*DataConfig\.num_workers=0"):
            config(data, pixel_path=path, device=device, num_workers=2).validate()
    for path, device in (("dali", None), ("dali", "cpu"), ("nvjpeg", "cpu"), ("auto", None), ("pil", None)):
        config(data, pixel_path=path, device=device, num_workers=2).validate()
    for field, value in (("aspect", "crop"), ("planner_backend", "rust")):
        with pytest.raises(ValueError, match=rf"DataConfig\.{field} must be one of .* got '{value}'"):
            config(data, **{field: value}).validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as inside a worker
    assert isinstance(loader_mod.make_pixel_path("auto"), PilPath)


def _pixel_paths():
    from fineviti.data import dali, nvjpeg
    from fineviti.data.pixels import PilPath

    paths = [pytest.param(PilPath, id="pil")]
    paths.append(pytest.param(lambda: nvjpeg.NvjpegPath("cpu"), id="nvjpeg",
                              marks=pytest.mark.skipif(not nvjpeg.available(), reason="no torchvision")))
    paths.append(pytest.param(dali.DaliPath, id="dali",
                              marks=pytest.mark.skipif(not dali.available(), reason="no nvidia-dali")))
    return paths


@pytest.mark.parametrize("make_path", _pixel_paths())
def test_every_pixel_path_reads_16_bit_pngs_exif_jpegs_and_empty_members_alike(make_path):
    """A 16-bit grayscale PNG keeps its high byte (convert("RGB") alone clipped it to white, nvJPEG's path passed
    uint16 values through); an EXIF-rotated JPEG is decoded as stored, as the planner sized it from its header
    (DALI's default rotated it and squashed it into the planned size; turning it upright is `assemble`'s, the same
    for every path); an empty member is an undecodable image
    (nvJPEG's path failed the whole loader on it)."""
    height, width = 28, 42
    ramp = (np.arange(width)[None, :] * 255 // width).repeat(height, 0).astype(np.uint8)
    png16 = io.BytesIO()
    Image.fromarray(ramp.astype(np.uint16) * 257).save(png16, "PNG")
    rgb = np.stack([ramp, np.full_like(ramp, 200), (np.arange(height)[:, None] * 9).repeat(width, 1)], -1)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    jpeg = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(jpeg, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(jpeg.getvalue())) as stored:
        want_jpeg = torch.from_numpy(np.asarray(stored.convert("RGB"))).permute(2, 0, 1)
    out = make_path().decode_resize([png16.getvalue(), jpeg.getvalue(), b""], [(height, width)] * 3)
    assert out[0].source_hw == (height, width) and out[1].source_hw == (height, width)
    assert torch.equal(out[0].pixels.cpu(), torch.from_numpy(ramp)[None].expand(3, -1, -1))
    assert (out[1].pixels.cpu().int() - want_jpeg.int()).abs().max() <= 2  # the same decoder up to its IDCT
    assert type(out[2]).__name__ == "BadSample" and out[2].reason == "undecodable_image"


def test_region_fields_of_the_wrong_type_are_bad_boxes():
    """A box must be four numbers and a caption a string: a null caption is not the caption "None", nor the string
    "1234" the box (1, 2, 3, 4)."""
    from collections import Counter

    from fineviti.data.dataset import RawSample
    from fineviti.data.pixels import _boxes

    regions = [{"bbox": [1, 2, 30, 40], "caption": "fine"}, {"bbox": [1, 2, 30, 40], "caption": None},
               {"bbox": "1234", "caption": "a string box"}, {"bbox": [1, 2, 30, 40], "caption": 7},
               {"bbox": [1, 2, 30], "caption": "three numbers"}, {"caption": "no box"}]
    raw = RawSample("k", b"", "c", regions, 64, 64)
    counters = Counter()
    out = _boxes(raw, (64, 64), counters)
    assert counters["bad_box"] == 5
    boxes, captions = out[0], out[1]
    assert captions == ["fine"] and [list(b) for b in boxes] == [[1.0, 2.0, 30.0, 40.0]]


def test_state_without_this_ranks_counters_keeps_the_fresh_ones(data):
    """A state saved under another world size has no counters for this rank: they stay as they were (they used to
    be reset, the dataset's own indexing counts with them); a state that has them brings them back."""
    loader = PackedLoader(config(data))
    loader.stats.update({"bad_json": 2})
    state = loader.state_dict()
    other = PackedLoader(config(data))
    other.stats.update({"missing_caption": 1})
    other.load_state_dict({k: v for k, v in state.items() if not k.startswith("stats_rank")})
    assert other.stats == {"missing_caption": 1}
    other.load_state_dict(state)
    assert other.stats == {"bad_json": 2}


def test_an_older_iterator_dropped_later_leaves_the_newer_one_running(data):
    """iter() twice, then the first iterator dropped: the second one's prefetch thread keeps running (the first
    one's cleanup stopped whichever thread was current, and the second then waited for a batch forever)."""
    import gc
    import threading

    loader = PackedLoader(config(data, prefetch=1))
    first = iter(loader)
    next(first)
    second = iter(loader)
    want = next(second).keys
    del first
    gc.collect()
    got = []
    consumer = threading.Thread(target=lambda: got.extend(next(second).keys for _ in range(2)), daemon=True)
    consumer.start()
    consumer.join(timeout=60)
    assert not consumer.is_alive(), "the newer iterator waits for a batch that never comes"
    assert len(got) == 2 and want
    loader.close()


def test_a_prefetch_thread_failing_on_a_full_queue_ends_when_closed_and_reports_to_a_reader(data, monkeypatch):
    """The thread's error put waited for room without looking at the stop flag: failing with the queue full (the
    consumer busy on a step), it blocked forever, close() gave up on it after 10 s and the thread leaked."""
    import threading
    import time

    from fineviti.data.loader import _Producer

    produce, failed = _Producer.__call__, threading.Event()

    def flaky(self, start, step):
        if step == 2:
            failed.set()
            raise OSError("disk went away")  # not a BadSample: the thread fails
        return produce(self, start, step)

    monkeypatch.setattr(_Producer, "__call__", flaky)
    loader = PackedLoader(config(data, prefetch=1))
    it = iter(loader)
    next(it)
    thread = loader._thread[0]
    assert failed.wait(timeout=60)  # step 1 fills the queue (prefetch 1), then step 2 fails
    began = time.monotonic()
    it.close()
    assert time.monotonic() - began < 5 and not thread.is_alive()
    # a consumer that keeps reading gets the batch before the failure, then the failure
    failed.clear()
    it = iter(loader)
    next(it)
    assert failed.wait(timeout=60)
    next(it)
    with pytest.raises(RuntimeError, match="prefetch thread failed") as raised:
        next(it)
    assert isinstance(raised.value.__cause__, OSError)
    loader.close()


def test_an_index_of_another_tar_is_written_again(tmp_path):
    """A tar rewritten after its index (other samples, other offsets): the stale index pointed into other
    samples' bytes (a JPEG kept as a caption). An index whose members' tar headers disagree with it is written
    again (file times say nothing after a copy: this one is made newer than its tar); an index that matches is
    kept, and on a read-only folder the scan serves with a warning."""
    import os

    from fineviti.data.dataset import ShardDataset

    def write(order):
        with ShardWriter(tmp_path, prefix="s", samples_per_shard=100) as writer:
            for i in order:
                writer.write(f"k{i}", [("jpg", _jpeg(64 + 8 * i, 64)), ("txt", f"caption {i}".encode()),
                                       ("json", json.dumps({"width": 64 + 8 * i, "height": 64}).encode())])

    write([0, 1, 2])
    assert len(ShardDataset(tmp_path)) == 3  # writes the index
    idx = index_path(tmp_path / "s-00000.tar")
    stale = idx.read_bytes()
    write([2, 0])  # rewritten (another tool, which leaves the old index alone)
    idx.write_bytes(stale)
    os.utime(idx, (os.path.getmtime(idx) + 10,) * 2)
    dataset = ShardDataset(tmp_path)
    assert [dataset.load(i).caption for i in range(len(dataset))] == ["caption 2", "caption 0"]
    assert list(dataset.keys) == ["k2", "k0"] and not dataset.stats
    fresh = idx.read_bytes()
    assert fresh != stale
    os.utime(idx, (os.path.getmtime(tmp_path / "s-00000.tar") - 100,) * 2)  # older than its tar, yet right
    ShardDataset(tmp_path)
    assert idx.read_bytes() == fresh and os.path.getmtime(idx) < os.path.getmtime(tmp_path / "s-00000.tar")
    idx.write_bytes(stale)  # stale again, in a folder that cannot be written
    os.chmod(tmp_path, 0o555)
    try:
        if os.access(tmp_path, os.W_OK):  # root writes anyway: make the write fail instead
            import unittest.mock

            from fineviti.data import shards as shards_mod

            with unittest.mock.patch.object(shards_mod.tempfile, "mkstemp", side_effect=PermissionError(13, "ro")):
                with pytest.warns(UserWarning, match="could not write the index"):
                    dataset = ShardDataset(tmp_path)
        else:
            with pytest.warns(UserWarning, match="could not write the index"):
                dataset = ShardDataset(tmp_path)
    finally:
        os.chmod(tmp_path, 0o755)
    assert [dataset.load(i).caption for i in range(len(dataset))] == ["caption 2", "caption 0"]


def test_a_blank_txt_leaves_the_json_caption(tmp_path):
    """A whitespace-only .txt beside a json "caption": the sample was dropped as missing_caption every epoch."""
    from fineviti.data.dataset import ShardDataset

    with ShardWriter(tmp_path, prefix="b") as writer:
        writer.write("k0", [("jpg", _jpeg(64, 64)), ("txt", b"  \n"),
                            ("json", json.dumps({"width": 64, "height": 64, "caption": "from json"}).encode())])
    dataset = ShardDataset(tmp_path)
    assert dataset.load(0).caption == "from json" and not dataset.stats


def test_images_beyond_pils_limit_are_left_out_for_every_path(tmp_path, monkeypatch):
    """PIL refuses images above twice Image.MAX_IMAGE_PIXELS (a DecompressionBombError), where DALI and nvJPEG
    decoded them: which samples a run saw depended on the pixel path, and the header scan counted such an image as
    an unreadable header. The scan now leaves them out as "too_large", whether the size comes from the header or
    the json. (PIL's limit is lowered here to keep the images small.)"""
    from fineviti.data.dataset import ShardDataset

    with ShardWriter(tmp_path, samples_per_shard=10) as writer:
        writer.write("small", [("jpg", _jpeg(8, 8)), ("txt", b"a")])
        writer.write("big_header", [("jpg", _jpeg(40, 40)), ("txt", b"b")])
        writer.write("big_json", [("jpg", _jpeg(8, 8)), ("txt", b"c"),
                                  ("json", json.dumps({"height": 40, "width": 40}).encode())])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # PIL refuses above 800 pixels
    dataset = ShardDataset(tmp_path)
    assert dataset.keys == ["small"] and dict(dataset.stats) == {"too_large": 2}


def _tagged(array: np.ndarray, code: int, fmt: str = "PNG") -> bytes:
    """`array` (h, w, 3) uint8 encoded as stored pixels with EXIF orientation `code`."""
    exif = Image.Exif()
    exif[0x0112] = code
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _upright(data: bytes) -> np.ndarray:
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_orientation_turns_pixels_as_pils_exif_transpose(fmt):
    """read_orientation finds each of the eight codes, and orient_pixels turns the stored pixels as PIL's
    ImageOps.exif_transpose does (the reference); a box's content stays under the turned box."""
    from fineviti.data.pixels import ORIENTATION_STEPS, orient_boxes, orient_pixels, read_orientation

    rng = np.random.default_rng(0)
    stored = rng.integers(0, 200, (20, 36, 3), dtype=np.uint8)
    stored[3:9, 22:33] = 255  # a white box: x 22..33, y 3..9
    for code in range(1, 9):
        data = _tagged(stored, code, fmt)
        turn = read_orientation(data)
        assert turn.code == code and not turn.declared_upright
        with Image.open(io.BytesIO(data)) as image:
            decoded = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        got = orient_pixels(decoded, ORIENTATION_STEPS[code])
        want = torch.from_numpy(_upright(data).copy()).permute(2, 0, 1)
        assert torch.equal(got, want), code
        (x0, y0, x1, y1), = orient_boxes([(22, 3, 33, 9)], 20, 36, ORIENTATION_STEPS[code])
        white = (want.int().min(0).values >= 250).nonzero()
        if fmt == "PNG":  # lossless: the white pixels are exactly the turned box
            assert (y0, x0, y1 - 1, x1 - 1) == (*white.min(0).values.tolist(), *white.max(0).values.tolist())
        else:
            assert ((white[:, 0] >= y0) & (white[:, 0] < y1) & (white[:, 1] >= x0) & (white[:, 1] < x1)).all()
    assert read_orientation(b"not an image").code == 1 and read_orientation(_tagged(stored, 9)).code == 1
    assert read_orientation(_tagged(stored, 6), (36, 20)).declared_upright  # the json gave the upright size
    assert not read_orientation(_tagged(stored, 6), (20, 36)).declared_upright
    assert not read_orientation(_tagged(stored, 3), (36, 20)).declared_upright  # 3 keeps the size: never upright
    assert read_orientation(_tagged(stored, 3), box_frame="upright").boxes_upright  # a data set can say so
    assert not read_orientation(_tagged(stored, 6), (36, 20), "stored").boxes_upright
    assert not read_orientation(stored.tobytes(), box_frame="upright").boxes_upright  # no image, no tag
    with pytest.raises(ValueError, match=r"box_frame must be one of \['auto', 'stored', 'upright'\], got 'up'"):
        read_orientation(_tagged(stored, 3), box_frame="up")


def _oriented_shards(folder, tokenizer_from, fmt="PNG"):
    """Three 56 x 112 stored images with a white box (no resize at patch 14), encoded as `fmt`: tagged 6 with the
    json's size and box as stored, tagged 6 with the json's size and box upright (a tool that wrote the upright
    size), tagged 3. Returns {key: (encoded bytes, the box's upright pixels)}."""
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 200, (56, 112, 3), dtype=np.uint8)
    stored[0:28, 14:42] = 255
    box = (14, 0, 42, 28)
    samples = {}
    with ShardWriter(folder, samples_per_shard=10) as writer:
        for key, code, declared_upright in (("six", 6, False), ("six_upright", 6, True), ("three", 3, False)):
            data = _tagged(stored, code, fmt)
            upright = _upright(_tagged(stored, code))  # the box from the lossless picture
            white = (upright.min(-1) >= 250).nonzero()
            upright_box = (white[1].min(), white[0].min(), white[1].max() + 1, white[0].max() + 1)
            height, width = upright.shape[:2] if declared_upright else stored.shape[:2]
            meta = {"width": int(width), "height": int(height),
                    "regions": [{"bbox": [int(v) for v in (upright_box if declared_upright else box)],
                                 "caption": "the white box"}]}
            writer.write(key, [("png" if fmt == "PNG" else "jpg", data), ("txt", b"a white box"),
                               ("json", json.dumps(meta).encode())])
            samples[key] = data, upright_box
    (folder / "tokenizer.json").write_bytes((tokenizer_from / "tokenizer.json").read_bytes())
    return samples


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("pixel_path", ["pil", "nvjpeg", "dali"])
def test_the_loader_turns_tagged_images_and_their_boxes_upright(data, tmp_path, pixel_path, fmt):
    """A photo stored sideways with an EXIF orientation tag trained sideways on every path; now it is turned upright
    (as PIL's exif_transpose, DALI's and Hugging Face's loaders do) in one place for every path, its boxes with it,
    whether the json gave the stored size and box or the upright ones. Off, the stored pixels as before."""
    from fineviti.data import dali, nvjpeg

    if pixel_path == "dali" and not dali.available() or pixel_path == "nvjpeg" and not nvjpeg.available():
        pytest.skip(f"no {pixel_path}")
    samples = _oriented_shards(tmp_path / "tagged", data, fmt)  # PNGs take PIL in the nvJPEG path, JPEGs its own
    cfg = dict(path=str(tmp_path / "tagged"), token_budget=4096, epochs=1, seed=0, pixel_path=pixel_path,
               device="cpu" if pixel_path != "pil" else None)
    for on in (True, False):
        loader = PackedLoader(DataConfig(exif_orientation=on, **cfg))
        batches = list(loader)
        # off, the json's upright size does not describe the stored pixels: counted, and left out of the checks
        assert loader.stats.get("size_mismatch", 0) == (0 if on else 1) and not loader.stats.get("bad_box")
        for batch in batches:
            for i, key in enumerate(batch.keys):
                if key == "six_upright" and not on:
                    continue
                data_bytes, upright_box = samples[key]
                with Image.open(io.BytesIO(data_bytes)) as image:
                    stored = np.asarray(image.convert("RGB"))
                want = _upright(data_bytes) if on else stored
                rows, cols = batch.grid_hw[i].tolist()
                assert (rows * 14, cols * 14) == want.shape[:2], (key, on)
                pixels = torch.from_numpy(want.copy()).permute(2, 0, 1)
                start, end = batch.cu_seqlens[i:i + 2].tolist()
                # JPEG: the decoders agree up to their IDCT (2 levels of 255; normalised, a level is 2 / 255)
                torch.testing.assert_close(batch.patches[start:end], normalise(patchify(pixels, 14, 1), 14),
                                           rtol=0, atol=1e-6 if fmt == "PNG" else 2.5 * 2 / 255, msg=f"{key} on={on}")
                (box,) = batch.boxes[batch.box_image == i].tolist()
                want_box = upright_box if on else (14, 0, 42, 28)
                assert [v * 14 for v in box] == pytest.approx(want_box), (key, on)
        loader.close()


def test_box_frame_upright_keeps_the_boxes_of_a_data_set_annotated_upright(data, tmp_path):
    """Auto cannot tell the boxes' frame where the orientation keeps the size (a half turn, code 3) or the image is
    square: their boxes were taken as stored and turned, silently wrong for a data set annotated upright (as tools
    that show photos upright annotate). `box_frame="upright"` keeps them; "stored" turns even a box whose json size
    is upright."""
    rng = np.random.default_rng(2)
    stored = rng.integers(0, 200, (56, 112, 3), dtype=np.uint8)
    stored[0:28, 14:42] = 255
    square = rng.integers(0, 200, (56, 56, 3), dtype=np.uint8)
    square[0:28, 14:42] = 255
    folder = tmp_path / "upright"
    truth = {}
    with ShardWriter(folder, samples_per_shard=10) as writer:
        for key, array, code in (("three", stored, 3), ("square_six", square, 6), ("six", stored, 6)):
            encoded = _tagged(array, code)
            white = (_upright(encoded).min(-1) >= 250).nonzero()
            box = [int(white[1].min()), int(white[0].min()), int(white[1].max()) + 1, int(white[0].max()) + 1]
            truth[key] = box
            regions = [{"bbox": box, "caption": "the white box"}]  # annotated on the upright photo
            writer.write(key, [("png", encoded), ("txt", b"a white box"), ("json", json.dumps({"regions": regions})
                                                                            .encode())])
    (folder / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())

    def boxes(frame):
        loader = PackedLoader(DataConfig(path=str(folder), token_budget=4096, epochs=1, seed=0, box_frame=frame))
        out = {b.keys[i]: [round(v * 14, 3) for v in b.boxes[b.box_image == i][0].tolist()] for b in loader
               for i in range(b.n_images)}
        loader.close()
        return out

    assert boxes("upright") == truth
    auto = boxes("auto")  # no json size: every box taken as stored, turned
    assert all(auto[k] != truth[k] for k in truth)
    with pytest.raises(ValueError, match=r"DataConfig\.box_frame must be one of"):
        PackedLoader(DataConfig(path=str(folder), box_frame="raw"))
