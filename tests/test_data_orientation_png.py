"""EXIF orientation of a PNG whose eXIf (or XMP, or raw-profile text) chunk follows its pixel data: PIL finds it only
once it has decoded the image; read_orientation, and the evaluator's header read, find it by walking the chunks."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fineviti.data.pixels import ORIENTATION_STEPS, orient_pixels, orientation_of, read_orientation


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, at = [], 8
    while at < len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        out.append((kind, png[at + 8:at + 8 + length]))
        at += 12 + length
    return out


def _exif_block(code: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = code
    return exif.tobytes()  # b"Exif\0\0" + the TIFF block


def _png(stored: np.ndarray, late: list[tuple[bytes, bytes]], early_code: int | None = None,
         idat_parts: int = 3, after_end: list[tuple[bytes, bytes]] = ()) -> bytes:
    """`stored` as a PNG whose pixel data is cut into `idat_parts` IDAT chunks, followed by the chunks `late`, then
    IEND (and `after_end` after it); with `early_code`, an eXIf chunk with that orientation before the pixels."""
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "PNG", **({"exif": _exif_block(early_code)} if early_code else {}))
    chunks = _chunks(buffer.getvalue())
    head = [c for c in chunks if c[0] not in (b"IDAT", b"IEND")]
    pixels = b"".join(data for kind, data in chunks if kind == b"IDAT")
    cut = np.linspace(0, len(pixels), idat_parts + 1).astype(int)
    idat = [(b"IDAT", pixels[a:b]) for a, b in zip(cut[:-1], cut[1:], strict=True)]
    body = [*head, *idat, *late, (b"IEND", b""), *after_end]
    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(kind, data) for kind, data in body)


def _late_exif(code: int) -> tuple[bytes, bytes]:
    return b"eXIf", _exif_block(code)[6:]  # the chunk holds the TIFF block without the "Exif\0\0" prefix


def _pil_code(data: bytes) -> int:
    """The orientation PIL's ImageOps.exif_transpose applies (it loads the image first, then reads getexif)."""
    with Image.open(io.BytesIO(data)) as image:
        ImageOps.exif_transpose(image)
        return image.getexif().get(0x0112, 1)


def _stored() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (20, 36, 3), dtype=np.uint8)


@pytest.mark.parametrize("code", range(1, 9))
def test_exif_chunk_after_the_pixels_is_read_as_pil_reads_it(code):
    """An eXIf chunk after IDAT gives the code exif_transpose applies (it used to count as upright), and the stored
    pixels turned by it are exif_transpose's."""
    data = _png(_stored(), [_late_exif(code)])
    with Image.open(io.BytesIO(data)) as image:
        assert Image.Image.getexif(image).get(0x0112) is None  # the header alone does not have it
        decoded = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    assert read_orientation(data).code == _pil_code(data) == code
    with Image.open(io.BytesIO(data)) as image:
        want = torch.from_numpy(np.array(ImageOps.exif_transpose(image).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(orient_pixels(decoded, ORIENTATION_STEPS[code]), want)
    assert read_orientation(data, (36, 20)).declared_upright == ("t" in ORIENTATION_STEPS[code])


def _xmp(code: int) -> bytes:
    return (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="%d"/>'
            b"</rdf:RDF></x:xmpmeta>" % code)


def _raw_profile(code: int) -> bytes:
    block = _exif_block(code)
    return b"Raw profile type exif\0" + f"\nexif\n{len(block):8}\n{block.hex()}\n".encode()


@pytest.mark.parametrize("case", ["late_over_early", "xmp", "compressed_xmp", "raw_profile", "after_iend",
                                  "late_without_tag", "bad_crc", "single_idat", "upright_late"])
def test_other_chunks_after_the_pixels_match_pil(case):
    """What exif_transpose reads after the pixels wins over the header, as in PIL (a late eXIf replaces an early
    one); XMP in an iTXt chunk and a raw EXIF profile in a tEXt chunk count too; nothing after IEND does."""
    stored = _stored()
    late, early, after_end, parts = [], None, [], 3
    if case == "late_over_early":
        late, early = [_late_exif(6)], 3
    elif case == "xmp":
        late = [(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + _xmp(8))]
    elif case == "compressed_xmp":
        late = [(b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0" + zlib.compress(_xmp(5)))]
    elif case == "raw_profile":
        late = [(b"tEXt", _raw_profile(7))]
    elif case == "after_iend":
        early, after_end = 3, [_late_exif(6)]
    elif case == "late_without_tag":
        late, early = [(b"eXIf", Image.Exif().tobytes()[6:])], 6  # the late block has no orientation: none
    elif case == "bad_crc":
        late = [_late_exif(6)]
    elif case == "single_idat":
        late, parts = [_late_exif(2)], 1
    elif case == "upright_late":
        late, early = [(b"tEXt", b"Comment\0hello"), _late_exif(1)], 8
    data = _png(stored, late, early, parts, after_end)
    if case == "bad_crc":  # PIL does not check the CRCs of the chunks after the pixels
        data = data[:-16] + bytes([data[-16] ^ 1]) + data[-15:]
    assert read_orientation(data).code == _pil_code(data)
    want = {"late_over_early": 6, "xmp": 8, "compressed_xmp": 5, "raw_profile": 7, "after_iend": 3,
            "late_without_tag": 1, "bad_crc": 6, "single_idat": 2, "upright_late": 1}[case]
    assert _pil_code(data) == want


def test_the_pixel_data_is_not_decompressed(tmp_path):
    """The walk skips IDAT's data: a PNG whose pixel data is not even zlib still gives its late eXIf's code (PIL's
    exif_transpose fails on it); an opened image keeps its file position and still loads."""
    data = _png(_stored(), [_late_exif(6)])
    chunks = _chunks(data)
    broken = b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(k, b"\xff" * len(d) if k == b"IDAT" else d) for k, d in chunks)
    assert read_orientation(broken).code == 6
    with Image.open(io.BytesIO(broken)) as image, pytest.raises(Exception):  # noqa: B017, PT011
        ImageOps.exif_transpose(image)
    path = tmp_path / "late.png"
    path.write_bytes(data)
    with Image.open(path) as image:
        assert orientation_of(image).code == 6
        assert np.array_equal(np.asarray(image.convert("RGB")), _stored())
        assert orientation_of(image).code == 6  # loaded (its file closed): the info has it


def test_the_evaluator_reads_the_late_tag_from_every_source(tmp_path):
    """The evaluator's header read (the box check's frame) gives the late tag for a path, bytes and an opened PIL
    image: a box below the stored height but inside the upright picture (declared upright) is accepted."""
    from fineviti.eval import loaders
    from fineviti.eval.runner import EvalConfig, Evaluator, RegionTask
    from tests import fixtures_eval as fx

    stored = np.zeros((48, 64, 3), dtype=np.uint8)
    stored[:, :32] = 255
    data = _png(stored, [_late_exif(6)])
    path = tmp_path / "late.png"
    path.write_bytes(data)
    evaluator = Evaluator(fx.FakeModel(), fx.word_tokenizer(), EvalConfig())
    for source in (str(path), data, Image.open(io.BytesIO(data))):
        width, height, turn = evaluator._header(source, "image")
        assert (width, height, turn.code) == (64, 48, 6)
        record = loaders.RegionRecord(source, [(0, 50, 20, 60)], [0], "k", (64, 48))  # y 50-60: upright only
        task = RegionTask([record], ["red", "blue"], project=fx.box_projection)
        assert evaluator.run({"r": task})["r"]["n"] == 1
