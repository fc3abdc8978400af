"""DALI (CPU, device_id=None) against PIL: the same sizes and layout, pixels within the stated tolerance."""

import io

import pytest
import torch
from PIL import Image

from fineviti.data import synth
from fineviti.data.loader import DataConfig, PackedLoader
from tests.fixtures_eval import encoded

pytest.importorskip("nvidia.dali")
pytest.importorskip("tokenizers")
from fineviti.data import dali  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("dali")
    synth.generate(out, images=24, seed=5, heldout=0, samples_per_shard=12, processes=1)
    return out


def batches(data, pixel_path, merge=1, **kwargs):
    cfg = DataConfig(path=str(data / "train"), token_budget=4096, merge=merge, epochs=1, seed=1, window=8,
                     pixel_path=pixel_path, **kwargs)
    loader = PackedLoader(cfg)
    out = list(loader)
    return out, loader


@pytest.mark.parametrize("merge", [1, 2])
def test_dali_cpu_matches_pil(data, merge):
    pil, _ = batches(data, "pil", merge)
    got, loader = batches(data, "dali", merge)
    assert len(got) == len(pil) and not loader.stats
    for a, b in zip(got, pil, strict=True):
        assert a.keys == b.keys
        for name in ("cu_seqlens", "pos", "grid_hw", "tokens", "text_cu_seqlens", "boxes", "box_image",
                     "region_tokens", "region_cu_seqlens"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.patches.shape == b.patches.shape and a.patches.dtype == b.patches.dtype
        levels = (a.patches - b.patches).abs() * 0.5 * 255  # SigLIP normalisation: one level is 2 / 255
        assert levels.max() <= dali.PIXEL_TOLERANCE + 1e-3
        for i in range(a.n_images):
            span = levels[a.cu_seqlens[i]:a.cu_seqlens[i + 1]]
            assert span.mean() <= dali.MEAN_TOLERANCE


def _jpeg(w, h):
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_dali_skips_an_undecodable_image_and_keeps_the_others():
    path = dali.DaliPath()
    images = [_jpeg(60, 40), b"\xff\xd8\xff" + bytes(300), _jpeg(30, 90)]
    out = path.decode_resize(images, [(28, 42), (28, 28), (84, 28)])
    assert isinstance(out[1], dali.BadSample) and out[1].reason == "undecodable_image"
    assert out[0].pixels.shape == (3, 28, 42) and out[0].source_hw == (40, 60)
    assert out[2].pixels.shape == (3, 84, 28) and out[2].source_hw == (90, 30)
    assert (out[0].pixels.float().mean(dim=(1, 2)) - torch.tensor([10.0, 200.0, 30.0])).abs().max() < 4
    again = path.decode_resize([_jpeg(16, 16)], [(14, 14)])  # the pipeline works after the failure
    assert again[0].pixels.shape == (3, 14, 14)


def test_dali_in_a_loader_worker_process(data):
    pil, _ = batches(data, "pil")
    got, _ = batches(data, "dali", num_workers=1)
    assert [b.keys for b in got] == [b.keys for b in pil]


@pytest.mark.gpu
def test_dali_mixed_decoder_on_the_gpu(data):
    pil, _ = batches(data, "pil")
    got, _ = batches(data, "dali", device="cuda")
    for a, b in zip(got, pil, strict=True):
        assert a.patches.is_cuda and torch.equal(a.pos, b.pos)
        levels = (a.patches.cpu() - b.patches).abs() * 0.5 * 255
        assert levels.max() <= dali.PIXEL_TOLERANCE + 1e-3  # nvJPEG's IDCT may differ: unverified here



def test_dali_falls_back_to_pil_for_an_image_its_decoder_refuses():
    """DALI's decoder refuses GIF's, which the planner's PIL header scan accepts: such an image now goes through the
    PIL path (it was a lost sample), and the BadSample of an image nobody decodes names DALI's cause, not its
    "pipeline object is no longer valid"."""
    from fineviti.data.pixels import PilPath

    gif = encoded("GIF")
    path = dali.DaliPath()
    out = path.decode_resize([gif, _jpeg(60, 40)], [(14, 28), (28, 42)])
    want = PilPath().decode_resize([gif], [(14, 28)])[0]
    assert type(out[0]).__name__ == "Decoded" and out[0].source_hw == (20, 30)
    assert torch.equal(out[0].pixels, want.pixels)
    assert out[1].pixels.shape == (3, 28, 42)
    (bad,) = path.decode_resize([b"\xff\xd8\xff" + bytes(300)], [(14, 14)])
    assert bad.reason == "undecodable_image" and "no longer valid" not in str(bad) and "PIL" in str(bad)
    assert "nvImageCodec failure" in str(bad), str(bad)
