"""Readers on the small fixture files in tests/data/fixtures (made by make_fixtures.py)."""
from pathlib import Path

import numpy as np
import pytest

from mllm_jax.data import formats
from mllm_jax.data.schema import DataError, validate_sample

FIX = Path(__file__).parent / "fixtures"


def _reason(source, i):
    with pytest.raises(DataError) as e:
        validate_sample(source[i])
    return e.value


def test_llava_reader():
    src = formats.LlavaSource(FIX / "llava.json")
    assert len(src) == 6
    s = validate_sample(src[0])
    assert s.id == "llava:ok1" and s.is_chat
    assert [(g.kind, g.role) for g in s.segments] == [
        ("image", "user"), ("text", "user"), ("text", "assistant"), ("text", "user"), ("text", "assistant")]
    assert s.segments[1].text == "What color is the square?"
    assert s.targets == ["It is red.", "Yes, it fills the image."]
    assert s.segments[0].image.shape == (8, 8, 3) and (s.segments[0].image == [220, 30, 30]).all()
    two = validate_sample(src[1])
    blue = two.segments[1].image
    assert two.num_images == 2 and (blue == [30, 40, 220]).all()       # images keep their order
    with pytest.raises(DataError) as e:
        src[2]
    assert e.value.reason == "image_count_mismatch" and "llava.json[2]" in str(e.value) and "2 <image> slots" in str(e.value)
    assert _reason(src, 3).reason == "missing_image" and "nope.png" in str(_reason(src, 3))
    assert _reason(src, 4).reason == "corrupt_image" and "corrupt.png" in str(_reason(src, 4))
    t = validate_sample(src[5])
    assert [g.role for g in t.segments] == ["system", "user", "assistant"] and t.num_images == 0


def test_interleaved_reader():
    src = formats.InterleavedSource(FIX / "interleaved.jsonl")
    assert len(src) == 7
    a = validate_sample(src[0])                                        # OBELICS-aligned lists
    assert [g.kind for g in a.segments] == ["text", "image", "text", "image"] and not a.is_chat
    assert (a.segments[1].image == [220, 30, 30]).all() and (a.segments[3].image == [30, 40, 220]).all()
    b = validate_sample(src[1])                                        # compact: one path per null
    assert [g.kind for g in b.segments] == ["image", "text", "image"]
    assert b.segments[2].image.shape == (12, 10, 1)
    with pytest.raises(DataError) as e:
        src[2]
    assert e.value.reason == "image_count_mismatch" and "interleaved.jsonl:3" in str(e.value)
    with pytest.raises(DataError) as e:
        src[3]
    assert e.value.reason == "invalid_utf8" and "interleaved.jsonl:4" in str(e.value)
    with pytest.raises(DataError) as e:
        src[4]
    assert e.value.reason == "bad_record" and "invalid JSON" in str(e.value)
    assert _reason(src, 5).reason == "empty_text"
    with pytest.raises(DataError, match=r"1 null entries in 'texts' \(image slots\) but 2 images"):
        src[6]


def test_bad_image_field_is_a_data_error(tmp_path):
    """An 'image' that is neither a path nor a list of paths is a skippable DataError naming the
    record and field (it was a TypeError that stopped the pipeline)."""
    import json
    turns = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]
    f = tmp_path / "l.json"
    f.write_text(json.dumps([{"id": "a", "image": 5, "conversations": turns},
                             {"id": "b", "image": [None], "conversations": turns}]))
    src = formats.LlavaSource(f)
    for i, rid in enumerate("ab"):
        with pytest.raises(DataError) as e:
            src[i]
        assert e.value.reason == "bad_record" and f"l.json[{i}] (id {rid})" in str(e.value) and "image" in str(e.value)


def test_line_records_name_the_physical_line(tmp_path):
    """Blank lines are skipped but still counted in the record name (file:line as an editor shows)."""
    f = tmp_path / "blank.jsonl"
    f.write_text('{"texts": ["ok"], "images": []}\n\n\n{"texts": "oops"}\n')
    src = formats.InterleavedSource(f)
    assert len(src) == 2
    with pytest.raises(DataError) as e:
        src[1]
    assert "blank.jsonl:4" in str(e.value)


def test_sixteen_bit_png_keeps_its_high_byte(tmp_path):
    """A 16-bit grayscale PNG (PIL mode I;16) decodes to its high byte, from a path or from bytes
    (PIL's convert('RGB') clipped it at 255: a gradient turned white)."""
    from PIL import Image
    from mllm_jax.data.schema import load_image
    g = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    for img in (tmp_path / "g16.png", (tmp_path / "g16.png").read_bytes()):
        a = load_image(img, "r", "image")
        assert a.shape == (64, 64, 1) and a.dtype == np.uint8
        np.testing.assert_array_equal(a[..., 0], g >> 8)


def test_float_tiff_is_read_as_a_float_image(tmp_path):
    """A 32-bit float TIFF (PIL mode F) in [0, 1] gives its values as 8-bit pixels; one outside
    [0, 1] is a bad_pixels DataError (skipped and counted) like a float array. PIL's
    convert('RGB') clipped the floats: 0.5 became 0, a [0, 255] image passed unchecked."""
    from PIL import Image
    from mllm_jax.data.schema import load_image
    g = np.linspace(0, 1, 32 * 16, dtype=np.float32).reshape(32, 16)
    Image.fromarray(g, mode="F").save(tmp_path / "f.tif")
    a = load_image(tmp_path / "f.tif", "r", "image")
    assert a.shape == (32, 16, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a[..., 0], np.round(g * 255).astype(np.uint8))
    Image.fromarray(g * 255, mode="F").save(tmp_path / "f255.tif")
    with pytest.raises(DataError, match=r"expected \[0, 1\]") as e:
        load_image(tmp_path / "f255.tif", "r", "image")
    assert e.value.reason == "bad_pixels"


def test_pairs_readers():
    src = formats.PairsSource(FIX / "pairs.jsonl")
    assert len(src) == 6
    p = validate_sample(src[1])
    assert p.segments[1].text == "a green square" and p.segments[0].image.shape == (8, 8, 3)
    f = validate_sample(src[2])
    assert f.segments[0].image.dtype == np.uint8 and (f.segments[0].image == 128).all()   # 0.5 -> 128
    assert _reason(src, 3).reason == "bad_pixels" and "NaN" in str(_reason(src, 3))
    assert _reason(src, 4).reason == "bad_pixels" and "[0, 1]" in str(_reason(src, 4))
    assert _reason(src, 5).reason == "empty_text"
    tsv = formats.PairsSource(FIX / "pairs.tsv", task="caption")
    assert len(tsv) == 2                                               # header skipped
    c = validate_sample(tsv[1])
    assert c.is_chat and c.targets == ["a blue\tsquare"]
    views = formats.PairsSource(FIX / "pairs.jsonl", task="vladva")[0]
    assert set(views) == {"image", "text"} and views["text"].segments[0].text == "a red square"


def test_fashion_mnist_fixture_parses():
    expected = np.load(FIX / "fashion_mnist" / "expected_images.npy")   # written by numpy, not our parser
    src = formats.FashionMNISTSource(FIX / "fashion_mnist", "train")
    assert len(src) == 3
    s = validate_sample(src[0])
    np.testing.assert_array_equal(s.segments[0].image[..., 0], expected[0])
    assert s.meta["class"] == "ankle boot" and s.segments[1].text == "a photo of an ankle boot"
    assert src[1].meta["class"] == "t-shirt" and src[2].segments[1].text == "a small picture of a sneaker"


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        formats.FashionMNISTSource(tmp_path, "train")


def test_fashion_mnist_installed():
    if not (formats.FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist")
    src = formats.FashionMNISTSource(split="test")
    assert len(src) == 10_000
    counts = np.bincount([src.label(i) for i in range(len(src))], minlength=10)
    assert (counts == 1000).all()                                        # the test set is balanced
    img = validate_sample(src[0]).segments[0].image
    assert img.shape == (28, 28, 1) and img.dtype == np.uint8 and img.max() > 0


def test_utf8_byte_order_mark_is_not_data(tmp_path):
    """Files saved with a UTF-8 BOM (Windows Notepad, Excel exports): the JSONL reader lost the
    first record (invalid JSON), the TSV reader took the header for a pair, and the LLaVA reader
    refused the file as 'not a UTF-8 JSON file'."""
    import json
    bom = "\ufeff"
    (tmp_path / "docs.jsonl").write_text(bom + '{"id": "a", "texts": ["hi"], "images": []}\n'
                                         '{"id": "b", "texts": ["yo"], "images": []}\n', encoding="utf-8")
    src = formats.InterleavedSource(tmp_path / "docs.jsonl")
    assert [src[i].id for i in range(len(src))] == ["interleaved:a", "interleaved:b"]
    assert src[0].meta["record"] == "docs.jsonl:1"
    (tmp_path / "p.tsv").write_text(bom + "image\tcaption\nred.png\ta red square\n", encoding="utf-8")
    pairs = formats.PairsSource(tmp_path / "p.tsv")
    assert len(pairs) == 1 and pairs[0].segments[0].image == tmp_path / "red.png"
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    (tmp_path / "l.json").write_text(bom + json.dumps([{"id": "c", "conversations": turns}]), encoding="utf-8")
    assert formats.LlavaSource(tmp_path / "l.json")[0].targets == ["yo"]


def test_llava_turn_with_a_non_string_speaker_is_a_data_error(tmp_path):
    """A turn whose 'from' is a list or an object (a malformed export) raised TypeError
    (unhashable type) from the role lookup, which stopped the pipeline instead of being skipped
    and counted as a bad record."""
    import json
    f = tmp_path / "l.json"
    f.write_text(json.dumps([{"id": "a", "conversations": [{"from": ["human"], "value": "hi"},
                                                           {"from": "gpt", "value": "yo"}]},
                             {"id": "b", "conversations": [{"from": "human", "value": "hi"},
                                                           {"from": {"role": "gpt"}, "value": "yo"}]}]))
    src = formats.LlavaSource(f)
    for i, t in enumerate((0, 1)):
        with pytest.raises(DataError) as e:
            src[i]
        assert e.value.reason == "bad_record" and f"l.json[{i}]" in str(e.value) and f"conversations[{t}]" in str(e.value)


def test_interleaved_bad_image_entry_names_its_position_in_images(tmp_path):
    """In the OBELICS-aligned layout the error named the k-th image (images[0]) instead of the
    entry's own index in 'images' (images[1] here)."""
    import json
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "x", "texts": ["hi", None], "images": [None, 5]}) + "\n")
    with pytest.raises(DataError, match=r"images\[1\]: expected a path string, got 5"):
        formats.InterleavedSource(tmp_path / "d.jsonl")[0]
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "y", "texts": [None, "hi", None], "images": ["a.png", 5]}) + "\n")
    with pytest.raises(DataError, match=r"images\[1\]: expected a path string, got 5"):
        formats.InterleavedSource(tmp_path / "c.jsonl")[0]           # compact layout: already right
