"""Image reading: every format and dtype round-trips exact values; failures carry reasons."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cell_images import DATA
from PIL import Image

from cytopretrain.core.errors import ImageReadError
from cytopretrain.core.imageio import ZProjection, _plain_tiff_layout, read_channels, read_image

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real test data not found at {DATA}")

RNG = np.random.default_rng(7)


def write_png(path: Path, array: np.ndarray) -> None:
    """Minimal PNG writer (filter 0, big-endian samples), independent of the reader's library."""
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[1 if array.ndim == 2 else array.shape[2]]
    depth = array.dtype.itemsize * 8
    rows = array.astype(f">u{array.dtype.itemsize}").reshape(array.shape[0], -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", array.shape[1], array.shape[0], depth, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def random_image(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return RNG.uniform(0.0015, 0.037, shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def read_error(path, *args) -> ImageReadError:
    with pytest.raises(ImageReadError) as caught:
        (read_channels if args else read_image)(path, *args)
    return caught.value


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "int32", "float32", "float64"])
def test_tiff_single_page_keeps_dtype_and_values(tmp_path, dtype):
    image = random_image((40, 50), dtype)
    tifffile.imwrite(tmp_path / "a.tif", image)
    out = read_image(tmp_path / "a.tif")
    assert out.dtype == image.dtype
    np.testing.assert_array_equal(out, image)


PLAIN_TIFFS = {  # written by tifffile: read without it, to the same array
    "uint8": {},
    "int16": {},
    "uint32": {},
    "float16": {},
    "float64": {},
    "big-endian uint16": {"byteorder": ">"},
    "strips of 7 rows": {"rowsperstrip": 7},
    "resolution and software tags": {"resolution": (3.0, 3.0), "software": "scope 1.0", "datetime": True},
    "no description": {"description": None, "metadata": None},
}
OTHER_TIFFS = {  # read by tifffile
    "zlib": {"compression": "zlib"},
    "predictor": {"compression": "zlib", "predictor": True},
    "tiled": {"tile": (16, 16)},
    "BigTIFF": {"bigtiff": True},
    "min-is-white": {"photometric": "miniswhite"},
    "ImageJ": {"imagej": True},
    "OME": {"ome": True},
    "free-text description": {"description": "acquired on a scope", "metadata": None},
}


@pytest.mark.parametrize("name", list(PLAIN_TIFFS) + list(OTHER_TIFFS))
def test_plain_tiff_planes_skip_tifffile_and_read_the_same(tmp_path, name):
    options = dict(PLAIN_TIFFS[name] if name in PLAIN_TIFFS else OTHER_TIFFS[name])
    dtype = name if name in ("uint8", "int16", "uint32", "float16", "float64") else "uint16"
    shape = (300, 230)  # larger than the bytes read to decide (64 KB) but for uint8
    image = random_image(shape, "float32").astype(dtype) if dtype == "float16" else random_image(shape, dtype)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, image, byteorder=options.pop("byteorder", "<"), **options)
    plain = _plain_tiff_layout(path.read_bytes()[: 1 << 16], path.stat().st_size)
    assert (plain is not None) == (name in PLAIN_TIFFS)
    out = read_image(path)
    expected = image.astype(np.float32) if dtype == "float16" else image
    assert out.dtype == expected.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, tifffile.imread(path).astype(out.dtype))


def test_plain_tiff_from_another_writer_and_cut_short(tmp_path):
    ramp = (np.arange(30 * 50, dtype=np.uint32) * 41 % 65536).astype(np.uint16).reshape(30, 50)
    Image.fromarray(ramp).save(tmp_path / "pil.tif")  # Pillow's own TIFF writer
    whole = (tmp_path / "pil.tif").read_bytes()
    assert _plain_tiff_layout(whole, len(whole)) is not None
    np.testing.assert_array_equal(read_image(tmp_path / "pil.tif"), ramp)
    (tmp_path / "cut.tif").write_bytes(whole[: len(whole) - 10])
    error = read_error(tmp_path / "cut.tif")
    assert error.reason == "unreadable" and "cut.tif" in error.detail


def test_tiff_pages_become_channels(tmp_path):
    pages = random_image((3, 40, 50), "uint16")
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="minisblack")
    with tifffile.TiffWriter(tmp_path / "series.tiff") as writer:  # one series per page
        for page in pages:
            writer.write(page)
    for name in ("pages.tif", "series.tiff"):
        out = read_image(tmp_path / name)
        assert out.shape == (40, 50, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[:, :, c], pages[c])


def test_tiff_rgb_and_ome(tmp_path):
    rgb = random_image((30, 20, 3), "uint8")
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), rgb)

    stack = random_image((2, 30, 20), "uint16")
    tifffile.imwrite(tmp_path / "a.ome.tif", stack, metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "a.ome.tif"), np.moveaxis(stack, 0, -1))

    zc = random_image((2, 3, 30, 20), "uint16")
    tifffile.imwrite(tmp_path / "zc.ome.tif", zc, metadata={"axes": "ZCYX"})
    error = read_error(tmp_path / "zc.ome.tif")
    assert error.reason == "stack" and "ZCYX" in error.detail and "z_projection" in error.detail
    projected = read_channels([tmp_path / "zc.ome.tif"], 3, "max")
    np.testing.assert_array_equal(projected, np.moveaxis(zc.max(axis=0), 0, -1))

    tifffile.imwrite(tmp_path / "tzyx.ome.tif", random_image((2, 2, 30, 20), "uint16"), metadata={"axes": "TZYX"})
    error = read_error(tmp_path / "tzyx.ome.tif")
    assert error.reason == "bad_shape" and "TZYX" in error.detail


def yeast_planes(n: int) -> tuple[list[Path], np.ndarray]:
    """The first ``n`` real yeast GFP planes (64 x 64 float32) and their (n, 64, 64) stack."""
    paths = sorted((DATA / "yeast_toy" / "images").glob("*/*_gfp.tif"))[:n]
    return paths, np.stack([tifffile.imread(p) for p in paths])


@needs_data
@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("zyx.tif", {"metadata": {"axes": "ZYX"}, "photometric": "minisblack"}),
        ("zyx.ome.tif", {"metadata": {"axes": "ZYX"}, "ome": True}),
        ("imagej.tif", {"imagej": True, "metadata": {"axes": "ZYX"}}),
        ("pages.tif", {"photometric": "minisblack"}),
    ],
)
def test_a_stack_in_a_channel_file_is_a_stack_not_a_grey_image(tmp_path, name, write):
    """Three real planes written as a Z-stack (tifffile, OME, ImageJ) or as bare pages used to be
    averaged as if they were RGB; they are a ``stack`` unless a z_projection reduces them."""
    _, planes = yeast_planes(3)
    tifffile.imwrite(tmp_path / name, planes, **write)
    rfp = tmp_path / "plane_rfp.tif"
    tifffile.imwrite(rfp, planes[0])
    for paths, expected in (([tmp_path / name, rfp], 2), ([tmp_path / name], 1)):
        with pytest.raises(ImageReadError) as caught:
            read_channels(paths, expected)
        assert caught.value.reason == "stack" and "3 planes" in caught.value.detail, caught.value.detail
        np.testing.assert_array_equal(read_channels(paths, expected, "max")[:, :, 0], planes.max(axis=0))
        np.testing.assert_allclose(read_channels(paths, expected, "mean")[:, :, 0], planes.mean(axis=0), rtol=1e-6)
        np.testing.assert_array_equal(read_channels(paths, expected, "pick:2")[:, :, 0], planes[2])
        with pytest.raises(ImageReadError, match="3 planes"):
            read_channels(paths, expected, "pick:3")


@needs_data
def test_colour_and_channel_axes_are_not_stacks(tmp_path):
    """An RGB TIFF (axis S) in a channel file is colour, averaged; a C axis there is refused; a
    5-plane Z-stack is a stack too (it used to be bad_shape)."""
    _, planes = yeast_planes(5)
    rgb = (planes[:3] * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", np.moveaxis(rgb, 0, -1), photometric="rgb")
    np.testing.assert_allclose(read_channels([tmp_path / "rgb.tif"], 1)[:, :, 0], rgb.mean(axis=0), rtol=1e-6)
    tifffile.imwrite(tmp_path / "cyx.tif", planes[:3], metadata={"axes": "CYX"}, photometric="minisblack")
    assert read_image(tmp_path / "cyx.tif").shape == (64, 64, 3)  # a file of all channels
    with pytest.raises(ImageReadError) as caught:
        read_channels([tmp_path / "cyx.tif"], 1)
    assert caught.value.reason == "bad_shape" and "3 channels along C" in caught.value.detail
    tifffile.imwrite(tmp_path / "z5.tif", planes, metadata={"axes": "ZYX"}, photometric="minisblack")
    with pytest.raises(ImageReadError) as caught:
        read_channels([tmp_path / "z5.tif"], 1)
    assert caught.value.reason == "stack"


def test_z_projection_text():
    assert [str(ZProjection.parse(t)) for t in ("max", "mean", "pick:0", " pick:12 ")] == [
        "max",
        "mean",
        "pick:0",
        "pick:12",
    ]
    for bad in ("median", "pick", "pick:-1", "max:1", "pick:x"):
        with pytest.raises(ValueError, match="max, mean or pick"):
            ZProjection.parse(bad)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_png_all_depths_and_colour_types(tmp_path, channels, dtype):
    shape = (33, 47) if channels == 1 else (33, 47, channels)
    image = random_image(shape, dtype)
    write_png(tmp_path / "a.png", image)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == image.dtype
    np.testing.assert_array_equal(out, image)


def test_16_bit_png_and_tiff_keep_more_than_256_levels(tmp_path):
    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 13
    Image.fromarray(ramp).save(tmp_path / "pil16.png")  # Pillow writes mode I;16
    write_png(tmp_path / "rgb16.png", np.stack([ramp, ramp[::-1], ramp.T], axis=-1))
    tifffile.imwrite(tmp_path / "a.tif", ramp)
    for name in ("pil16.png", "rgb16.png", "a.tif"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.uint16
        assert np.unique(out).size > 256
    np.testing.assert_array_equal(read_image(tmp_path / "pil16.png"), ramp)


def test_jpeg_and_bmp(tmp_path):
    gray = random_image((24, 36), "uint8")
    rgb = random_image((24, 36, 3), "uint8")
    Image.fromarray(gray).save(tmp_path / "g.bmp")
    Image.fromarray(rgb).save(tmp_path / "c.BMP")
    np.testing.assert_array_equal(read_image(tmp_path / "g.bmp"), gray)
    np.testing.assert_array_equal(read_image(tmp_path / "c.BMP"), rgb)

    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "p.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "p.bmp"), np.array(palette.convert("RGB")))

    smooth = np.add.outer(np.arange(24), np.arange(36)).astype(np.uint8) * 3
    Image.fromarray(smooth).save(tmp_path / "s.jpg", quality=95)
    out = read_image(tmp_path / "s.jpg")
    assert out.dtype == np.uint8 and out.shape == smooth.shape
    assert np.abs(out.astype(int) - smooth).mean() < 2  # lossy, but the same picture


def test_npy_layouts(tmp_path):
    hw = random_image((20, 30), "float32")
    hwc = random_image((20, 30, 3), "uint16")
    chw = random_image((5, 20, 30), "int16")
    swapped = random_image((20, 30), "uint16").astype(">u2")
    for name, array in {"hw": hw, "hwc": hwc, "chw": chw, "be": swapped}.items():
        np.save(tmp_path / f"{name}.npy", array)
    np.testing.assert_array_equal(read_image(tmp_path / "hw.npy"), hw)
    np.testing.assert_array_equal(read_image(tmp_path / "hwc.npy"), hwc)
    np.testing.assert_array_equal(read_image(tmp_path / "chw.npy"), np.moveaxis(chw, 0, -1))
    out = read_image(tmp_path / "be.npy")
    assert out.dtype.isnative and out.dtype == np.uint16
    np.testing.assert_array_equal(out, swapped)

    for name, shape in {"line": (50,), "cube": (20, 30, 40), "four": (2, 3, 20, 30)}.items():
        np.save(tmp_path / f"{name}.npy", np.zeros(shape, np.uint8))
        assert read_error(tmp_path / f"{name}.npy").reason == "bad_shape"


def test_npy_versions_orders_and_headers_read_as_np_load(tmp_path):
    """The one-read NPY reader against np.load: format versions 1 and 2, Fortran order,
    several files sharing one header (parsed once) and a writable result."""
    rng = np.random.default_rng(3)
    arrays = {
        "v1": rng.integers(0, 4096, (20, 30, 3)).astype(np.uint16),
        "fortran": np.asfortranarray(rng.random((20, 30)).astype(np.float64)),
        "same_header": rng.integers(0, 4096, (20, 30, 3)).astype(np.uint16),
    }
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    with open(tmp_path / "v2.npy", "wb") as file:
        np.lib.format.write_array(file, arrays["v1"], version=(2, 0))
    arrays["v2"] = arrays["v1"]
    for name, array in arrays.items():
        out = read_image(tmp_path / f"{name}.npy")
        reference = np.load(tmp_path / f"{name}.npy")
        assert out.dtype == reference.dtype and out.flags.writeable
        np.testing.assert_array_equal(out, reference)
        np.testing.assert_array_equal(out, array)


def test_bad_npy_files_name_their_reason(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((8, 8), np.uint16))
    data = good.read_bytes()
    (tmp_path / "magic.npy").write_bytes(b"\x00" * 6 + data[6:])
    (tmp_path / "version.npy").write_bytes(data[:6] + b"\x09" + data[7:])
    (tmp_path / "header.npy").write_bytes(data.replace(b"'descr'", b"'dexcr'"))
    (tmp_path / "syntax.npy").write_bytes(data.replace(b"{", b"[", 1))
    for name in ("magic", "version", "header", "syntax"):
        error = read_error(tmp_path / f"{name}.npy")
        assert error.reason == "unreadable" and f"{name}.npy" in error.detail, (name, error.detail)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    error = read_error(tmp_path / "objects.npy")
    assert error.reason == "unsupported_format" and "objects" in error.detail


def test_a_directory_with_an_image_suffix_is_unreadable(tmp_path):
    (tmp_path / "folder.tif").mkdir()
    error = read_error(tmp_path / "folder.tif")
    assert error.reason == "unreadable" and "not a regular file" in error.detail


# ------------------------------------------------------------------ failures


def test_missing_empty_and_unsupported(tmp_path):
    assert read_error(tmp_path / "nope.tif").reason == "missing_file"
    (tmp_path / "empty.png").write_bytes(b"")
    error = read_error(tmp_path / "empty.png")
    assert error.reason == "empty_file" and "empty.png" in error.detail
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    assert read_error(tmp_path / "a.gif").reason == "unsupported_format"
    np.save(tmp_path / "c.npy", np.zeros((4, 4), np.complex64))
    assert read_error(tmp_path / "c.npy").reason == "unsupported_format"


@pytest.mark.parametrize("name", ["a.tif", "a.png", "a.jpg", "a.npy", "a.bmp"])
def test_truncated_files_are_unreadable(tmp_path, name):
    image = random_image((64, 64), "uint16" if name.endswith(("tif", "png", "npy")) else "uint8")
    good = tmp_path / name
    if name.endswith("tif"):
        tifffile.imwrite(good, image)
    elif name.endswith("npy"):
        np.save(good, image)
    else:
        Image.fromarray(image).save(good)
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    error = read_error(cut)
    assert error.reason == "unreadable"
    assert str(cut) in error.detail and len(error.detail) > len(str(cut)) + 5  # library error included


def test_garbage_with_image_suffix_is_unreadable(tmp_path):
    (tmp_path / "noise.png").write_bytes(RNG.bytes(500))
    assert read_error(tmp_path / "noise.png").reason == "unreadable"


# ------------------------------------------------------------------ read_channels


def test_one_file_per_channel(tmp_path):
    planes = [random_image((30, 40), "uint16") for _ in range(3)]
    paths = []
    for c, plane in enumerate(planes):
        paths.append(str(tmp_path / f"c{c}.tif"))
        tifffile.imwrite(paths[-1], plane)
    out = read_channels(paths, 3)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint16
    for c, plane in enumerate(planes):
        np.testing.assert_array_equal(out[:, :, c], plane)


def test_rgb_channel_file_is_averaged_to_gray(tmp_path):
    rgb = random_image((30, 40, 3), "uint8")
    gray = random_image((30, 40), "uint8")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = read_channels([tmp_path / "rgb.png", tmp_path / "gray.png"])
    assert out.shape == (30, 40, 2)
    np.testing.assert_allclose(out[:, :, 0], rgb.astype(np.float64).sum(axis=2) / 3, rtol=1e-6)
    np.testing.assert_array_equal(out[:, :, 1], gray)
    # A single RGB file described as one channel is averaged as well; otherwise kept as three.
    np.testing.assert_allclose(read_channels([tmp_path / "rgb.png"], 1)[:, :, 0], out[:, :, 0])
    assert read_channels([tmp_path / "rgb.png"]).shape == (30, 40, 3)


def test_single_multichannel_file(tmp_path):
    stack = random_image((4, 30, 40), "uint16")
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    out = read_channels([tmp_path / "stack.tif"], 4)
    np.testing.assert_array_equal(out, np.moveaxis(stack, 0, -1))
    error = read_error([tmp_path / "stack.tif"], 3)
    assert error.reason == "wrong_channel_count" and "stack.tif" in error.detail


def test_channel_count_and_shape_errors(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", random_image((30, 40), "uint16"))
    tifffile.imwrite(tmp_path / "b.tif", random_image((30, 41), "uint16"))
    assert read_error([tmp_path / "a.tif", tmp_path / "a.tif"], 3).reason == "wrong_channel_count"
    error = read_error([tmp_path / "a.tif", tmp_path / "b.tif"], 2)
    assert error.reason == "shape_mismatch"
    assert "a.tif" in error.detail and "b.tif" in error.detail
    assert read_error([tmp_path / "a.tif", tmp_path / "gone.tif"], None).reason == "missing_file"
    np.save(tmp_path / "five.npy", np.zeros((20, 30, 5), np.uint8))
    assert read_error([tmp_path / "a.tif", tmp_path / "five.npy"], None).reason == "bad_shape"


# ------------------------------------------------------------------ real data


@needs_data
def test_real_rxrx1_site_matches_pillow():
    first = sorted((DATA / "rxrx1").glob("train/*/Plate1/*_s1_w1.png"))[0]
    paths = [first.with_name(first.name.replace("_w1", f"_w{c}")) for c in range(1, 7)]
    out = read_channels(paths, 6)
    assert out.shape == (512, 512, 6) and out.dtype == np.uint8
    for c, path in enumerate(paths):
        np.testing.assert_array_equal(out[:, :, c], np.array(Image.open(path)))


@needs_data
def test_real_float_tiffs_and_uint16_npy():
    gfp = sorted((DATA / "yeast_toy" / "images").glob("*/*_gfp.tif"))[0]
    yeast = read_channels([gfp, gfp.with_name(gfp.name.replace("_gfp", "_rfp"))], 2)
    assert yeast.dtype == np.float32 and yeast.shape == (64, 64, 2)
    np.testing.assert_array_equal(yeast[:, :, 0], tifffile.imread(gfp))
    assert 0 < yeast.min() and yeast.max() < 1  # the small native range is kept, not rescaled

    blue = sorted(DATA.glob("hpa_toy/*/*_blue.tif"))[0]
    hpa = read_channels([blue] + [blue.with_name(blue.name.replace("blue", s)) for s in ("green", "red")], 3)
    assert hpa.dtype == np.float32 and hpa.shape == (128, 128, 3)

    cell = sorted((DATA / "bbbc021_cells").glob("*/*.npy"))[0]
    out = read_channels([cell], 3)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, np.load(cell))
