"""torchvision's decode path (nvJPEG on a GPU; the same code on the CPU here) against PIL."""

import io

import pytest
import torch
from PIL import Image

from fineviti.data import synth
from fineviti.data.loader import DataConfig, PackedLoader
from tests.fixtures_eval import encoded

pytest.importorskip("torchvision")
pytest.importorskip("tokenizers")  # the synthetic data's tokenizer (the GPU machines install offline)
from fineviti.data import nvjpeg  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("nvjpeg")
    synth.generate(out, images=16, seed=8, heldout=0, samples_per_shard=8, processes=1)
    return out


def batches(data, pixel_path, device=None, merge=1):
    cfg = DataConfig(path=str(data / "train"), token_budget=4096, merge=merge, epochs=1, seed=2, window=8,
                     pixel_path=pixel_path, device=device)
    loader = PackedLoader(cfg)
    return list(loader), loader


def check_against_pil(got, pil, max_levels=nvjpeg.PIXEL_TOLERANCE, percentile_levels=nvjpeg.PERCENTILE_TOLERANCE,
                      mean_levels=nvjpeg.MEAN_TOLERANCE):
    assert len(got) == len(pil)
    for a, b in zip(got, pil, strict=True):
        assert a.keys == b.keys
        for name in ("cu_seqlens", "pos", "grid_hw", "tokens", "boxes", "region_tokens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        levels = (a.patches.cpu() - b.patches).abs() * 0.5 * 255
        means = [levels[a.cu_seqlens[i]:a.cu_seqlens[i + 1]].mean().item() for i in range(a.n_images)]
        # the whole distribution in the message: a failure on a GPU (nvJPEG) then says how far off it is
        spread = (f"max {levels.max().item():.1f}, 99.9th percentile {levels.flatten().float().quantile(0.999):.1f}, "
                  f"share above 4 levels {(levels > 4).float().mean().item():.2e}, worst image mean {max(means):.3f}")
        assert levels.max() <= max_levels + 1e-3, spread
        assert levels.flatten().float().quantile(0.999) <= percentile_levels + 1e-3, spread
        assert max(means) <= mean_levels, spread


@pytest.mark.parametrize("merge", [1, 2])
def test_torchvision_cpu_matches_pil(data, merge):
    pil, _ = batches(data, "pil", merge=merge)
    got, loader = batches(data, "nvjpeg", device="cpu", merge=merge)
    assert not loader.stats
    check_against_pil(got, pil)


def _encode(w, h, fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bad_images_are_isolated_and_pngs_decode(device):
    path = nvjpeg.NvjpegPath(device)
    images = [_encode(60, 40, "JPEG"), b"\xff\xd8\xff" + bytes(300), _encode(30, 90, "PNG"), b"not an image"]
    out = path.decode_resize(images, [(28, 42), (28, 28), (84, 28), (14, 14)])
    assert [type(o).__name__ for o in out] == ["Decoded", "BadSample", "Decoded", "BadSample"]
    assert out[0].pixels.shape == (3, 28, 42) and out[0].source_hw == (40, 60)
    assert out[2].pixels.shape == (3, 84, 28) and out[2].source_hw == (90, 30)
    assert out[0].pixels.device.type == device
    assert (out[2].pixels.float().mean(dim=(1, 2)).cpu() - torch.tensor([10.0, 200.0, 30.0])).abs().max() < 2


@pytest.mark.gpu
def test_nvjpeg_on_the_gpu_matches_pil(data):
    pil, _ = batches(data, "pil")
    got, loader = batches(data, "nvjpeg", device="cuda")
    assert all(b.patches.is_cuda for b in got) and not loader.stats
    # nvJPEG against libjpeg-turbo: the GPU bounds, above the figures measured twice (nvjpeg's docstring); a
    # corrupted or misplaced image is off by tens of levels on average and still fails
    check_against_pil(got, pil, max_levels=nvjpeg.GPU_PIXEL_TOLERANCE,
                      percentile_levels=nvjpeg.GPU_PERCENTILE_TOLERANCE, mean_levels=nvjpeg.GPU_MEAN_TOLERANCE)


def decode_differences(device: str, samples: int = 24) -> list[tuple[float, float, tuple[int, int]]]:
    """(mean, max |torchvision's decode on `device` - PIL's| in levels, (height, width)) of each synthetic JPEG,
    worst mean first: the decoder alone, without the resize (nvJPEG on a GPU, libjpeg-turbo on the CPU)."""
    import numpy as np
    from torchvision.io import ImageReadMode, decode_jpeg

    out = []
    for index in range(samples):
        _, jpg, _, _ = synth.make_sample(8, 0, index)
        raw = torch.frombuffer(bytearray(jpg), dtype=torch.uint8)
        cpu = torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))).permute(2, 0, 1).float()
        other = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device).cpu().float()
        diff = (other - cpu).abs()
        out.append((diff.mean().item(), diff.max().item(), tuple(cpu.shape[1:])))
    return sorted(out, reverse=True)


def test_torchvision_cpu_decode_is_pils():
    """Both libjpeg-turbo with the same settings: identical pixels (what lets the GPU test below read its figures
    as nvJPEG's own)."""
    assert all(mean == 0 and peak == 0 for mean, peak, _ in decode_differences("cpu", samples=4))


@pytest.mark.gpu
def test_nvjpeg_decode_alone_against_libjpeg():
    """nvJPEG against PIL, the decode alone (no resize): its worst images go to the warnings summary
    of the GPU check's log, passing or not, so that the next run says where the 2.577-level image mean comes from."""
    import warnings

    worst = decode_differences("cuda")
    report = ", ".join(f"{h}x{w} px: mean {mean:.3f} max {peak:.0f}" for mean, peak, (h, w) in worst[:4])
    warnings.warn(f"nvJPEG against PIL, decode alone, worst images: {report}", stacklevel=1)
    assert worst[0][0] <= nvjpeg.GPU_MEAN_TOLERANCE, report


def test_cuda_decode_drains_the_stream_first(monkeypatch):
    """nvJPEG's hardware decoder writes before the stream's queued work has run (it corrupted a batch on an H100):
    the CUDA path synchronises the current stream before every batched decode. Checked here with fakes for the
    stream and the decoder, since this machine has no GPU."""
    import torchvision.io

    calls = []

    class Stream:
        def synchronize(self):
            calls.append("sync")

    def decode_jpeg(data, mode=None, device=None):
        calls.append("decode")
        return [torch.zeros(3, 4, 4, dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    path = nvjpeg.NvjpegPath("cuda")
    out = path.decode_resize([_encode(4, 4, "JPEG"), _encode(4, 4, "JPEG")], [(4, 4), (4, 4)])
    assert [type(o).__name__ for o in out] == ["Decoded", "Decoded"]
    assert calls == ["sync", "decode"]
    calls.clear()
    nvjpeg.NvjpegPath("cpu").decode_resize([_encode(4, 4, "JPEG")], [(4, 4)])
    assert "sync" not in calls


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu(monkeypatch):
    """nvJPEG refuses some JPEGs that libjpeg-turbo reads (the planner's PIL header scan accepted them): such an
    image is decoded on the CPU and moved to the device, and only one the CPU refuses too is a bad sample (both
    used to be lost). A fake decoder stands for the device's, on the "meta" device, since this machine has no GPU."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    refused = _encode(30, 20, "JPEG")  # the device's decoder refuses this one; the CPU reads it

    def device_decode_jpeg(data, mode=None, device="cpu"):
        if torch.device(device).type == "cpu":
            return real(data, mode=mode, device=device)
        batch = data if isinstance(data, list) else [data]
        if any(bytes(d.numpy()) == refused for d in batch):
            raise RuntimeError("nvjpegDecode: unsupported JPEG")
        images = [real(d, mode=mode).to(device) for d in batch]  # what the CPU refuses, the device refuses too
        return images if isinstance(data, list) else images[0]

    monkeypatch.setattr(torchvision.io, "decode_jpeg", device_decode_jpeg)
    path = nvjpeg.NvjpegPath("meta")
    images = [_encode(60, 40, "JPEG"), refused, b"\xff\xd8\xff" + bytes(300)]
    out = path.decode_resize(images, [(28, 42), (14, 28), (14, 14)])
    assert [type(o).__name__ for o in out] == ["Decoded", "Decoded", "BadSample"]
    assert out[1].source_hw == (20, 30) and out[1].pixels.shape == (3, 14, 28)
    assert out[1].pixels.device.type == "meta"
    assert "meta" in str(out[2]) and "cpu" in str(out[2])  # both decoders' refusals are named



def test_images_that_are_not_jpegs_decode_as_the_pil_path_decodes_them():
    """Not JPEGs: torchvision's decode_image killed the process (a segfault in libpng) on a PNG with a bad IDAT
    checksum, and refused GIF's, BMP, TIFF and animated WebP, which PIL, the planner's header scan and the PIL path
    take. They now decode with PIL, pixel for pixel as the PIL path does."""
    import struct
    import zlib

    from fineviti.data.pixels import PilPath

    png = bytearray(encoded("PNG"))
    at = png.index(b"IDAT") - 4  # the chunk's length, then its type, data and CRC
    (length,) = struct.unpack(">I", png[at:at + 4])
    crc_at = at + 8 + length
    assert struct.unpack(">I", png[crc_at:crc_at + 4])[0] == zlib.crc32(png[at + 4:crc_at])
    png[crc_at:crc_at + 4] = b"\x00\x00\x00\x00"  # a bad checksum: PIL reads the data anyway
    frames = [Image.new("RGB", (30, 20), c) for c in ((200, 40, 90), (10, 10, 10))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    images = [bytes(png), encoded("GIF"), encoded("BMP"), encoded("TIFF"), buffer.getvalue()]
    targets = [(14, 28)] * len(images)
    got = nvjpeg.NvjpegPath("cpu").decode_resize(images, targets)
    want = PilPath().decode_resize(images, targets)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert type(g).__name__ == "Decoded" and type(w).__name__ == "Decoded", (i, g, w)
        assert g.source_hw == w.source_hw == (20, 30)
        assert (g.pixels.int() - w.pixels.int()).abs().max() <= nvjpeg.PIXEL_TOLERANCE, i
