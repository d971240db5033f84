"""The training-curves PNG (src/train/plot.c) via build/tests/plotcheck: decoded here by a small
PNG reader written from the spec (pixels by PIL when it is installed), then checked for size,
the documented line colours in each panel, the direction of the curves, text, and atomic
writing."""
import math, os, re, struct, subprocess, zlib
import numpy as np
from common import BUILD, ROOT, tmpdir

CHECK = os.path.join(BUILD, "tests", "plotcheck")


def _header_consts():
    src = open(os.path.join(ROOT, "src", "train", "plot.h")).read()
    get = lambda name: [int(x) for x in
                        re.search(rf"#define {name}\s+([\d, ]+)", src).group(1).split(",")]
    return get("PLOT_WIDTH")[0], get("PLOT_HEIGHT")[0], get("PLOT_TRAIN_RGB"), get("PLOT_TEST_RGB")


W, H, TRAIN, TEST = _header_consts()


def png_decode(path):
    """8-bit RGB/RGBA non-interlaced PNG -> uint8 array [H, W, 3]. The structure (signature,
    chunk CRCs, IHDR, inflated size, row filters) is always checked here; pixels come from PIL
    when it is installed, else from the decoder below."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, idat, ihdr, seen_end = 8, b"", None, False
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            seen_end = True
        pos += 12 + n
    assert ihdr and seen_end, "IHDR or IEND missing"
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, f"unexpected PNG format {ihdr}"
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    assert len(raw) == h * (stride + 1), "IDAT size does not match IHDR"
    filters = raw[::stride + 1]
    assert max(filters) <= 4, f"bad row filter {max(filters)}"
    try:   # PIL decodes the pixels when it is installed (fast) ...
        from PIL import Image
        return np.asarray(Image.open(path).convert("RGB"))
    except ImportError:
        pass
    # ... else undo the row filters here (PNG spec, section 9), one byte at a time
    out, prev = [], [0] * stride
    for y in range(h):
        f, line = filters[y], raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)]
        cur = [0] * stride
        for i in range(stride):
            a = cur[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 0:
                pred = 0
            elif f == 1:
                pred = a
            elif f == 2:
                pred = b
            elif f == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            cur[i] = (line[i] + pred) & 255
        out.append(cur)
        prev = cur
    img = np.array(out, np.uint8).reshape(h, w, bpp)[:, :, :3]
    return img


def _plot(rows, *flags, rc=0):
    d = tmpdir()
    out = os.path.join(d, "curves.png")
    text = "".join(" ".join(str(v) for v in r) + "\n" for r in rows)
    p = subprocess.run([CHECK, out] + list(flags), input=text, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == rc, f"plotcheck exit {p.returncode}: {p.stderr.strip()}"
    if rc:
        return p.stderr
    assert os.listdir(d) == ["curves.png"], f"leftover files: {os.listdir(d)}"
    img = png_decode(out)
    assert img.shape == (H, W, 3), f"image {img.shape}, expected {(H, W, 3)}"
    return img


def _mask(img, rgb):
    return np.all(img == np.array(rgb, np.uint8), axis=2)


def _panels(img):
    return img[:, :W // 2], img[:, W // 2:]


def _trend(mask):
    """Correlation of pixel x with pixel y over a mask: > 0 when the curve goes down."""
    ys, xs = np.nonzero(mask)
    return np.corrcoef(xs, ys)[0, 1]


def _typical(n):
    return [(2.3 * math.exp(-e / 5) + 0.1, 2.3 * math.exp(-e / 6) + 0.25,
             100 - 90 * math.exp(-e / 4), 97 - 90 * math.exp(-e / 5)) for e in range(1, n + 1)]


def test_plot_typical_run():
    img = _plot(_typical(12), "--title", "googlenet on fashion-mnist")
    for name, panel in zip(("loss", "accuracy"), _panels(img)):
        for cname, rgb in (("train", TRAIN), ("test", TEST)):
            n = _mask(panel, rgb).sum()
            assert n > 300, f"{name} panel: only {n} pixels of the {cname} colour {rgb}"
    loss, acc = _panels(img)
    # the legend samples are short; the curves dominate the trend
    assert _trend(_mask(loss, TRAIN)) > 0.5, "the falling loss is not drawn falling"
    assert _trend(_mask(acc, TRAIN)) < -0.5, "the rising accuracy is not drawn rising"
    # test loss above train loss (smaller row index) on average
    assert np.nonzero(_mask(loss, TEST))[0].mean() < np.nonzero(_mask(loss, TRAIN))[0].mean()
    dark = img.max(axis=2) < 100
    assert dark[:50, W // 4:3 * W // 4].sum() > 200, "no title text"
    assert dark[H - 60:].sum() > 200, "no axis labels under the plots"
    assert (img == 255).all(axis=2).mean() > 0.6, "the background is not mostly white"


def test_plot_one_epoch():
    img = _plot([(0.5, 0.6, 0.0, 100.0)])
    for panel in _panels(img):
        assert _mask(panel, TRAIN).sum() > 30 and _mask(panel, TEST).sum() > 30, \
            "a single epoch must still show as points"
    # accuracy 100 (test) is drawn above accuracy 0 (train); both inside the image
    acc = _panels(img)[1]
    assert np.nonzero(_mask(acc, TEST))[0].mean() < np.nonzero(_mask(acc, TRAIN))[0].mean()


def test_plot_flat_curves_and_extremes():
    img = _plot([(1.0, 1.0, 50.0, 50.0)] * 5)   # flat: a zero data range must not break scaling
    for panel in _panels(img):
        assert _mask(panel, TEST).sum() > 300
    img = _plot([(0.0, 5.0, 0.0, 100.0)] * 3 + [(0.0, 5.0, 100.0, 0.0)] * 3)
    for panel in _panels(img):
        assert _mask(panel, TRAIN).sum() > 100 and _mask(panel, TEST).sum() > 100


def test_plot_train_only_with_gaps():
    rows = [r if i not in (4, 5) else ("nan",) * 4 for i, r in enumerate(_typical(30))]
    img = _plot(rows, "--no-test")
    assert not _mask(img, TEST).any(), "test colour drawn without test curves"
    for panel in _panels(img):
        assert _mask(panel, TRAIN).sum() > 300


def test_plot_many_epochs_and_huge_values():
    rows = [(1e7 / e, 2e7 / e, 100 * e / 300, 90 * e / 300) for e in range(1, 301)]
    img = _plot(rows)
    for panel in _panels(img):
        assert _mask(panel, TRAIN).sum() > 300 and _mask(panel, TEST).sum() > 300


def test_plot_errors():
    err = _plot([], rc=1)
    assert "no epochs" in err, err
    d = tmpdir()
    bad = os.path.join(d, "missing-dir", "x.png")
    p = subprocess.run([CHECK, bad], input="1 1 1 1\n", capture_output=True, text=True)
    assert p.returncode == 1 and "missing-dir" in p.stderr, p.stderr
    # replacing an existing file goes through rename: the old content is gone, no temp left
    out = os.path.join(d, "c.png")
    open(out, "wb").write(b"old")
    subprocess.run([CHECK, out], input="1 2 3 4\n2 1 4 5\n", check=True, capture_output=True,
                   text=True)
    assert png_decode(out).shape == (H, W, 3) and os.listdir(d) == ["c.png"]
