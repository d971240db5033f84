"""Data sets, preprocessing and augmentation (src/data), through the tests/datacheck helper.

Inputs are written here (IDX gz/plain, CIFAR-10 binary, image folders via PIL) and the results
are checked against what was written, against numpy reading the real Fashion-MNIST files, and
against torch / torchvision for the resizes, the batch pipeline and RandomResizedCrop."""
import contextlib, gzip, json, math, os, struct, subprocess, time
from unittest import mock
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from common import BUILD, tmpdir

DC = os.path.join(BUILD, "tests", "datacheck")
FASHION = "/usr/share/datasets/fashion-mnist"
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"]


def dc(*args, rc=0):
    p = subprocess.run([DC] + [str(a) for a in args], capture_output=True, text=True, timeout=300)
    if p.returncode != rc:
        raise AssertionError(f"datacheck {' '.join(map(str, args))}: exit {p.returncode}, "
                             f"wanted {rc}; stderr: {p.stderr.strip()[-1500:]}")
    return p


def dc_json(*args):
    return json.loads(dc(*args).stdout)


def dc_error(*args, must_name):
    """Runs datacheck expecting failure: exit 1 and one stderr line naming `must_name`."""
    p = dc(*args, rc=1)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got {p.stderr!r}"
    assert must_name in lines[0], f"error does not name {must_name!r}: {lines[0]!r}"
    return lines[0]


def load(source, size=0):
    """Loads via datacheck; returns (info, {split: (pixels NxCxHxW uint8, labels int64)})."""
    prefix = os.path.join(tmpdir(), "out")
    info = dc_json("load", source, prefix, size)
    out = {}
    for split in ("train", "test"):
        s = info[split]
        pix = np.fromfile(prefix + f".{split}.pix", dtype=np.uint8)
        out[split] = (pix.reshape(s["n"], s["C"], s["H"], s["W"]),
                      np.fromfile(prefix + f".{split}.lab", dtype=np.int64))
    return info, out


# ------------------------------------------------------------------ writers of test inputs

def idx_bytes(arr, magic_dims):
    return struct.pack(">I", 0x800 | magic_dims) + b"".join(
        struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()


def write(path, data, gz=False):
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def make_idx_dir(gz, n_train=7, n_test=3, H=5, W=4, seed=0):
    rs = np.random.RandomState(seed)
    d = tmpdir()
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        img = rs.randint(0, 256, size=(n, H, W)).astype(np.uint8)
        lab = rs.randint(0, 10, size=n).astype(np.uint8)
        ext = ".gz" if gz else ""
        write(f"{d}/{prefix}-images-idx3-ubyte{ext}", idx_bytes(img, 3), gz)
        write(f"{d}/{prefix}-labels-idx1-ubyte{ext}", idx_bytes(lab, 1), gz)
        data[prefix] = (img, lab)
    return d, data


def make_cifar_dir(counts=(3, 2, 1, 2, 1, 4), meta=True, seed=1):
    rs = np.random.RandomState(seed)
    d = tmpdir()
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    recs = {}
    for f, n in zip(files, counts):
        lab = rs.randint(0, 10, size=n).astype(np.uint8)
        img = rs.randint(0, 256, size=(n, 3, 32, 32)).astype(np.uint8)
        raw = b"".join(bytes([lab[i]]) + img[i].tobytes() for i in range(n))
        write(f"{d}/{f}", raw)
        recs[f] = (img, lab)
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    if meta:
        write(f"{d}/batches.meta.txt", ("\n".join(names) + "\n\n").encode())
    return d, recs, names


def make_folder(size=16, seed=2):
    """train/{cat,ant,bee} and val/{ant,cat} with PNG (RGB, grey, RGBA), BMP and JPEG files, all
    size x size so that loading at that size is exact (no resampling)."""
    from PIL import Image
    rs = np.random.RandomState(seed)
    d = tmpdir()
    expect = {"train": [], "val": []}   # (class index, path, RGB array or None for JPEG)
    layout = {"train": {"cat": ["b.png", "a.bmp", "c.jpg"], "ant": ["z.png", "y.PNG"],
                        "bee": ["g.jpeg", "h.png", "notes.txt"]},
              "val": {"cat": ["v.png"], "ant": ["w.jpg", "u.png"]}}
    classes = sorted(layout["train"])
    for split, cls in layout.items():
        for c, files in cls.items():
            os.makedirs(f"{d}/{split}/{c}")
            for k, fn in enumerate(files):
                path = f"{d}/{split}/{c}/{fn}"
                if fn.endswith(".txt"):
                    write(path, b"not an image")
                    continue
                rgb = rs.randint(0, 256, size=(size, size, 3)).astype(np.uint8)
                if fn.lower().endswith((".jpg", ".jpeg")):
                    # Smooth content so that decoder differences stay small.
                    yy, xx = np.mgrid[0:size, 0:size]
                    rgb = np.stack([(xx * 255 // size), (yy * 255 // size),
                                    np.full_like(xx, 40 * k + 30)], -1).astype(np.uint8)
                    Image.fromarray(rgb).save(path, quality=95)
                    ref = np.asarray(Image.open(path).convert("RGB"))
                    expect[split].append((classes.index(c), fn, ref, True))
                    continue
                if k == 1 and fn.endswith(".png"):
                    grey = rgb[:, :, 0]
                    Image.fromarray(grey, "L").save(path)
                    rgb = np.stack([grey] * 3, -1)
                elif fn == "h.png":
                    rgba = np.concatenate([rgb, rs.randint(0, 256, (size, size, 1)).astype(np.uint8)], -1)
                    Image.fromarray(rgba, "RGBA").save(path)
                else:
                    Image.fromarray(rgb).save(path)
                expect[split].append((classes.index(c), fn, rgb, False))
    for split in expect:   # ImageFolder order: class index, then file name
        expect[split].sort(key=lambda e: (e[0], e[1]))
    return d, classes, expect


# ------------------------------------------------------------------ loaders

def test_idx_gz_and_plain():
    for gz in (True, False):
        d, data = make_idx_dir(gz)
        for kind, names in (("fashion-mnist", FASHION_NAMES), ("mnist", [str(i) for i in range(10)])):
            info, out = load(f"{kind}:{d}")
            for split, prefix in (("train", "train"), ("test", "t10k")):
                img, lab = data[prefix]
                pix, got = out[split]
                assert pix.shape == (len(img), 1, 5, 4), pix.shape
                assert np.array_equal(pix[:, 0], img), f"{kind} {split} pixels differ (gz={gz})"
                assert np.array_equal(got, lab.astype(np.int64)), f"{kind} {split} labels differ"
                assert info[split]["classes"] == names and info[split]["name"] == kind


def test_idx_bad_inputs():
    d, data = make_idx_dir(True)
    tr = f"{d}/train-images-idx3-ubyte.gz"
    lb = f"{d}/train-labels-idx1-ubyte.gz"
    img, lab = data["train"]
    good_img, good_lab = idx_bytes(img, 3), idx_bytes(lab, 1)
    cases = [
        (tr, b"\x00\x00\x08\x01" + good_img[4:], "magic"),              # label magic on images
        (tr, good_img[:4] + struct.pack(">I", 0) + good_img[8:], "dimension"),
        (tr, good_img[:-5], "truncated"),
        (tr, good_img[:10], "truncated"),                               # inside the header
        (tr, good_img + b"\x00", "after"),                              # trailing data
        (lb, idx_bytes(lab[:-1], 1), "labels"),                         # count mismatch
        (lb, idx_bytes(np.where(np.arange(len(lab)) == 3, 10, lab), 1), "out of range"),
    ]
    for path, data_bytes, word in cases:
        write(path, data_bytes, gz=True)
        line = dc_error("load", f"mnist:{d}", "-", must_name=os.path.basename(path))
        assert word in line, f"{word!r} not in {line!r}"
        write(tr, good_img, gz=True)
        write(lb, good_lab, gz=True)
    # A corrupt gzip stream (valid header, garbage body) and a gzip file cut short.
    raw = gzip.compress(good_img)
    write(tr, raw[:12] + bytes(200) + raw[12:])
    dc_error("load", f"fashion-mnist:{d}", "-", must_name=tr)
    write(tr, raw[:len(raw) // 2])
    dc_error("load", f"fashion-mnist:{d}", "-", must_name=tr)
    os.remove(tr)
    dc_error("load", f"fashion-mnist:{d}", "-", must_name="train-images-idx3-ubyte")
    dc_error("load", f"mnist:{d}/nonexistent", "-", must_name=f"{d}/nonexistent")
    dc_error("load", "imagenet:/x", "-", must_name="imagenet")
    dc_error("load", "folder:", "-", must_name="folder")


def test_cifar10():
    d, recs, names = make_cifar_dir()
    info, out = load(f"cifar10:{d}")
    tr_img = np.concatenate([recs[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    tr_lab = np.concatenate([recs[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    assert np.array_equal(out["train"][0], tr_img) and np.array_equal(out["train"][1], tr_lab)
    assert np.array_equal(out["test"][0], recs["test_batch.bin"][0])
    assert np.array_equal(out["test"][1], recs["test_batch.bin"][1])
    assert info["train"]["classes"] == names and info["train"]["C"] == 3
    assert np.allclose(info["train"]["mean"], [0.4914, 0.4822, 0.4465])
    # The batches inside DIR/cifar-10-batches-bin (as the tarball unpacks) and no meta file.
    d2, recs2, _ = make_cifar_dir(meta=False)
    parent = tmpdir()
    os.rename(d2, f"{parent}/cifar-10-batches-bin")
    info, out = load(f"cifar10:{parent}")
    assert info["test"]["classes"][0] == "airplane" and info["train"]["n"] == 9
    # Bad inputs.
    bad = f"{d}/data_batch_3.bin"
    good = open(bad, "rb").read()
    for data_bytes, word in ((good[:-1], "multiple of 3073"), (b"", "multiple of 3073"),
                             (bytes([10]) + good[1:], "label 10")):
        write(bad, data_bytes)
        line = dc_error("load", f"cifar10:{d}", "-", must_name=bad)
        assert word in line, line
    write(bad, good)
    write(f"{d}/batches.meta.txt", b"a\nb\n")
    dc_error("load", f"cifar10:{d}", "-", must_name="batches.meta.txt")
    os.remove(f"{d}/batches.meta.txt")
    os.remove(f"{d}/test_batch.bin")
    dc_error("load", f"cifar10:{d}", "-", must_name=f"{d}/test_batch.bin")


def test_folder():
    size = 16
    d, classes, expect = make_folder(size)
    info, out = load(f"folder:{d}", size)
    assert info["train"]["classes"] == classes == ["ant", "bee", "cat"]
    assert info["test"]["classes"] == classes
    for split, key in (("train", "train"), ("test", "val")):
        pix, lab = out[split]
        exp = expect[key]
        assert pix.shape == (len(exp), 3, size, size), (split, pix.shape)
        assert lab.tolist() == [e[0] for e in exp], (split, lab.tolist())
        for k, (c, fn, rgb, lossy) in enumerate(exp):
            got = pix[k].transpose(1, 2, 0).astype(int)
            diff = np.abs(got - rgb.astype(int))
            if lossy:   # stb's and libjpeg's decoders differ by rounding
                assert diff.mean() < 1.5 and diff.max() <= 8, f"{fn}: jpeg mean {diff.mean()} max {diff.max()}"
            else:
                assert diff.max() == 0, f"{fn}: pixels differ"
    # Mean/std come from the training split.
    tr = out["train"][0].astype(np.float64) / 255
    assert np.allclose(info["train"]["mean"], tr.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(info["train"]["std"], tr.std(axis=(0, 2, 3)), atol=1e-6)
    assert info["test"]["mean"] == info["train"]["mean"]


def test_folder_resize_vs_torch():
    """Stored size: shorter side to S (antialiased bilinear), centre crop, rounded to uint8."""
    from PIL import Image
    rs = np.random.RandomState(5)
    d = tmpdir()
    shapes = [(40, 23), (23, 40), (9, 7), (30, 30)]   # (H, W): down, down, up, down
    os.makedirs(f"{d}/train/a")
    os.makedirs(f"{d}/val/a")
    imgs = []
    for k, (H, W) in enumerate(shapes):
        rgb = rs.randint(0, 256, size=(H, W, 3)).astype(np.uint8)
        Image.fromarray(rgb).save(f"{d}/train/a/{k}.png")
        imgs.append(rgb)
    Image.fromarray(imgs[0]).save(f"{d}/val/a/x.png")
    S = 12
    info, out = load(f"folder:{d}", S)
    for k, rgb in enumerate(imgs):
        H, W = rgb.shape[:2]
        t = torch.from_numpy(rgb).permute(2, 0, 1).float()[None]
        nh, nw = (S, int(S * W / H)) if H <= W else (int(S * H / W), S)
        r = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=True)[0] if (nh, nw) != (H, W) else t[0]
        top, left = int(round((nh - S) / 2.0)), int(round((nw - S) / 2.0))
        ref = r[:, top:top + S, left:left + S].round().clamp(0, 255)
        got = torch.from_numpy(out["train"][0][k].astype(np.float32))
        diff = (got - ref).abs().max().item()
        assert diff <= 1, f"image {k} {H}x{W}: max diff {diff}"


def test_folder_bad_inputs():
    d, classes, expect = make_folder(8)
    # A corrupt image.
    bad = f"{d}/train/bee/h.png"
    good = open(bad, "rb").read()
    write(bad, good[:40])
    dc_error("load", f"folder:{d}", "-", "8", must_name=bad)
    write(bad, b"GIF89a not really")
    dc_error("load", f"folder:{d}", "-", "8", must_name=bad)
    write(bad, b"")
    dc_error("load", f"folder:{d}", "-", "8", must_name=bad)
    write(bad, good)
    # A val class that training does not have.
    os.makedirs(f"{d}/val/dog")
    write(f"{d}/val/dog/a.png", good)
    line = dc_error("load", f"folder:{d}", "-", "8", must_name=f"{d}/val/dog")
    assert "dog" in line
    os.remove(f"{d}/val/dog/a.png")
    # An empty class folder (it is now empty in val; then in train).
    dc_error("load", f"folder:{d}", "-", "8", must_name=f"{d}/val/dog")
    os.rmdir(f"{d}/val/dog")
    os.makedirs(f"{d}/train/empty")
    dc_error("load", f"folder:{d}", "-", "8", must_name=f"{d}/train/empty")
    os.rmdir(f"{d}/train/empty")
    dc("load", f"folder:{d}", "-", "8")   # sane again
    e = tmpdir()
    dc_error("load", f"folder:{e}", "-", must_name=e)
    os.makedirs(f"{e}/train")
    dc_error("load", f"folder:{e}", "-", must_name=f"{e}/train")
    dc_error("load", f"folder:{e}/missing", "-", must_name=f"{e}/missing")


def test_fashion_mnist_real():
    """The installed Fashion-MNIST: counts, and every pixel/label against a numpy read."""
    info, out = load("fashion-mnist")
    assert info["train"]["n"] == 60000 and info["test"]["n"] == 10000
    assert (info["train"]["H"], info["train"]["W"], info["train"]["C"]) == (28, 28, 1)
    assert info["train"]["classes"] == FASHION_NAMES
    for split, prefix in (("train", "train"), ("test", "t10k")):
        with gzip.open(f"{FASHION}/{prefix}-images-idx3-ubyte.gz") as f:
            img = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(f"{FASHION}/{prefix}-labels-idx1-ubyte.gz") as f:
            lab = np.frombuffer(f.read(), np.uint8, offset=8)
        assert np.array_equal(out[split][0][:, 0], img), f"{split} pixels differ"
        assert np.array_equal(out[split][1], lab), f"{split} labels differ"
    # The published normalisation constants match the data (to their 4 digits).
    tr = out["train"][0] / 255.0
    assert abs(tr.mean() - info["train"]["mean"][0]) < 1e-4 and abs(tr.std() - info["train"]["std"][0]) < 1e-4


def test_speed():
    b = dc_json("bench")
    print(f"    fashion-mnist load {b['load_s']:.2f} s, batch_make 128x1x32x32 {b['batch128_ms']:.2f} ms")
    assert b["n_train"] == 60000
    # Generous bounds (shared machine, sanitizer builds): about 0.2 s and 0.3 ms when optimised.
    assert b["load_s"] < 15 and b["batch128_ms"] < 100, b


# ------------------------------------------------------------------ resizing and batches

def resize_c(x, OH, OW, aa):
    d = tmpdir()
    C, H, W = x.shape
    x.numpy().astype(np.float32).tofile(f"{d}/in")
    dc("resize", f"{d}/in", f"{d}/out", C, H, W, OH, OW, int(aa))
    return torch.from_numpy(np.fromfile(f"{d}/out", dtype=np.float32).reshape(C, OH, OW))


def test_resize_vs_torch():
    g = torch.Generator().manual_seed(0)
    for (C, H, W, OH, OW) in [(1, 28, 28, 32, 32), (3, 32, 32, 224, 224), (3, 7, 5, 3, 11),
                              (2, 13, 17, 13, 9), (1, 5, 5, 5, 5), (3, 256, 200, 224, 224),
                              (1, 1, 1, 4, 3), (1, 9, 4, 1, 1), (3, 500, 375, 256, 187)]:
        x = torch.rand(C, H, W, generator=g) * 255
        for aa in (False, True):
            ref = F.interpolate(x[None], size=(OH, OW), mode="bilinear", align_corners=False,
                                antialias=aa)[0]
            got = resize_c(x, OH, OW, aa)
            err = (got - ref).abs().max().item()
            # A few float32 ulps (PyTorch's kernels use FMA; the antialias sums are longer).
            assert err <= 255 * 2e-6, f"{(C, H, W, OH, OW)} aa={aa}: max abs err {err}"


def torch_sample(img, crop, meta):
    """torchvision's pipeline on one uint8 CxHxW image with the crop the library drew:
    ToTensor, zero pad + crop (or RRC box), bilinear resize, flip, grey->RGB, Normalize."""
    top, left, h, w, flip = crop
    C, H, W = img.shape
    t = torch.from_numpy(img.copy()).float().div(255)
    pt, pl = max(0, -top), max(0, -left)
    pb, pr = max(0, top + h - H), max(0, left + w - W)
    t = F.pad(t, (pl, pr, pt, pb))
    t = t[:, top + pt:top + pt + h, left + pl:left + pl + w]
    OH, OW = meta["out_H"], meta["out_W"]
    if (h, w) != (OH, OW):
        t = F.interpolate(t[None], size=(OH, OW), mode="bilinear", align_corners=False,
                          antialias=False)[0]
    if flip:
        t = t.flip(-1)
    if meta["out_C"] == 3 and C == 1:
        t = t.expand(3, -1, -1)
    mean = torch.tensor(meta["mean"][:meta["out_C"]], dtype=torch.float32)[:, None, None]
    std = torch.tensor(meta["std"][:meta["out_C"]], dtype=torch.float32)[:, None, None]
    return (t - mean) / std


def batch(source, **kw):
    prefix = os.path.join(tmpdir(), "b")
    meta = dc_json("batch", source, prefix, *[f"{k}={v}" for k, v in kw.items()])
    x = np.fromfile(prefix + ".x", dtype=np.float32).reshape(-1, meta["out_C"], meta["out_H"], meta["out_W"])
    y = np.fromfile(prefix + ".y", dtype=np.int64)
    crops = np.fromfile(prefix + ".crops", dtype=np.int32).reshape(-1, 10)
    return meta, x, y, crops


def check_batch(source, pixels, labels, **kw):
    meta, x, y, crops = batch(source, **kw)
    B = len(x)
    for b in range(B):
        top, left, h, w, flip, i, et, el, eh, ew = crops[b].tolist()
        if meta["rrc"] and kw.get("augment", 1) and kw.get("train", 1):
            assert 0 <= top and top + h <= meta["H"] and 0 <= left and left + w <= meta["W"], crops[b]
        elif meta["pad"] and kw.get("augment", 1) and kw.get("train", 1):
            assert abs(top) <= meta["pad"] and abs(left) <= meta["pad"] and (h, w) == (meta["H"], meta["W"])
        ref = torch_sample(pixels[i], (top, left, h, w, flip), meta)
        if eh:   # RandomErasing(value=0) after Normalize: torchvision's F.erase
            assert meta["erase"] > 0 and 0 <= et and et + eh <= meta["out_H"] and \
                0 <= el and el + ew <= meta["out_W"], crops[b]
            ref = TF.erase(ref, et, el, eh, ew, torch.tensor(0.0))
        err = (torch.from_numpy(x[b]) - ref).abs().max().item()
        assert err <= 2e-5, f"{source} {kw} sample {b}: max abs err {err} crop {crops[b]}"
        assert y[b] == labels[i]
    return meta, x, crops


def test_batch_vs_torchvision():
    d, data = make_idx_dir(True, n_train=40, H=28, W=28)
    pix = data["train"][0][:, None]
    lab = data["train"][1]
    # Fashion-MNIST-style: pad 2 + flip, grey replicated to 3 channels, 28 -> 32.
    meta, x, crops = check_batch(f"fashion-mnist:{d}", pix, lab, image_size=32, out_c=3, b=40,
                                 seed=3, shuffle=1)
    assert meta["out_C"] == 3 and np.allclose(meta["mean"], [0.286] * 3)
    assert crops[:, 4].min() == 0 and crops[:, 4].max() == 1, "flips never/always drawn"
    assert len(set(map(tuple, crops[:, :2].tolist()))) > 5, "pad-crop offsets barely vary"
    # Larger padding, 1 channel, downscale; eval; eval with a centre crop.
    check_batch(f"mnist:{d}", pix, lab, image_size=20, pad=6, b=16, seed=4)
    check_batch(f"mnist:{d}", pix, lab, image_size=32, b=8, train=0)
    for f in (0.7, 0.75):   # 28*0.75 = 21: an odd margin, torchvision rounds half to even
        meta, x, crops = check_batch(f"mnist:{d}", pix, lab, image_size=24, b=8, train=0, eval_crop=f)
        ch = round(28 * f)
        assert crops[0].tolist()[:4] == [int(round((28 - ch) / 2.0))] * 2 + [ch, ch], crops[0]
    # CIFAR-style colour at 32 -> 40.
    cd, recs, _ = make_cifar_dir(counts=(10, 10, 10, 10, 10, 4))
    cpix = np.concatenate([recs[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    clab = np.concatenate([recs[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    check_batch(f"cifar10:{cd}", cpix, clab, image_size=40, b=50, seed=9, shuffle=1)
    # RandomResizedCrop on a folder set, and its eval centre crop (0.875).
    fd, classes, expect = make_folder(32)
    info, out = load(f"folder:{fd}", 32)
    meta, x, crops = check_batch(f"folder:{fd}", out["train"][0], out["train"][1], image_size=24,
                                 b=len(out["train"][0]), seed=11, folder_size=32)
    assert meta["rrc"] == 1 and len(set(map(tuple, crops[:, :4].tolist()))) > 3
    check_batch(f"folder:{fd}", out["test"][0], out["test"][1], image_size=28, b=3, test=1,
                train=0, folder_size=32)
    # RandomErasing on top of pad-crop + flip: about half the samples get a box.
    meta, x, crops = check_batch(f"fashion-mnist:{d}", pix, lab, image_size=32, out_c=3, b=40,
                                 seed=5, erase=0.5)
    erased = int((crops[:, 8] > 0).sum())
    assert 8 <= erased <= 32, f"{erased}/40 samples erased at p=0.5"
    assert (x[crops[:, 8] > 0] == 0).any() and len(set(crops[:, 8].tolist())) > 3
    # Eval batches are never erased.
    _, _, crops = check_batch(f"fashion-mnist:{d}", pix, lab, image_size=32, b=8, train=0, erase=1)
    assert not crops[:, 8].any()


def test_augmentation_determinism():
    d, data = make_idx_dir(True, n_train=64, H=28, W=28)
    src = f"fashion-mnist:{d}"
    _, x1, y1, c1 = batch(src, b=64, seed=5, shuffle=1, image_size=32)
    _, x2, y2, c2 = batch(src, b=64, seed=5, shuffle=1, image_size=32)
    _, x3, y3, c3 = batch(src, b=64, seed=6, shuffle=1, image_size=32)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2), "same seed, different batch"
    assert not np.array_equal(x1, x3) and not np.array_equal(c1[:, 5], c3[:, 5]), "seed ignored"
    # The shuffle is a permutation.
    assert sorted(c1[:, 5].tolist()) == list(range(64))
    # No augmentation: a training batch equals the eval batch of the same images.
    _, xa, _, _ = batch(src, b=16, augment=0, image_size=32)
    _, xe, _, _ = batch(src, b=16, train=0, image_size=32)
    assert np.array_equal(xa, xe)


@contextlib.contextmanager
def fed_draws(draws, picks):
    """torch.empty(1).uniform_() returns the next of `draws`, torch.randint the next of `picks`
    (checked to lie in its range): torchvision's get_params then replays incept's draws."""
    class Fake:
        def uniform_(self, lo, hi):
            return torch.tensor([draws.pop(0)], dtype=torch.float32)

    real_randint = torch.randint

    def randint(lo, hi, size):
        v = picks.pop(0)
        assert lo <= v < hi, (lo, v, hi)
        return real_randint(v, v + 1, size)

    with mock.patch.object(torch, "empty", lambda *a, **k: Fake()), \
         mock.patch.object(torch, "randint", randint):
        yield


def test_rrc_vs_torchvision():
    """rrc_box follows RandomResizedCrop.get_params: torchvision fed the same draws (its
    uniform_ and randint patched to return them) must choose the same box."""
    import torchvision.transforms as T
    fracs = []   # where in its free range each random box lies: should be uniform
    for (H, W, s0, s1, r0, r1) in [(32, 32, 0.08, 1.0, 3 / 4, 4 / 3), (256, 180, 0.08, 1.0, 3 / 4, 4 / 3),
                                   (20, 200, 0.08, 1.0, 3 / 4, 4 / 3), (200, 20, 0.5, 1.0, 3 / 4, 4 / 3),
                                   (10, 10, 0.9, 1.0, 0.2, 5.0), (7, 9, 1.0, 1.0, 1.0, 1.0)]:
        res = dc_json("rrc", H, W, 123, s0, s1, r0, r1, 40)
        r0f, r1f = res["ratio"]
        for box in res["boxes"]:
            draws = [v for pair in box["draws"] for v in pair]
            top, left = box["box"][:2]

            with fed_draws(draws, [top, left]):
                ref = T.RandomResizedCrop.get_params(torch.zeros(1, H, W), [s0, s1], [r0f, r1f])
            assert list(ref) == box["box"], f"{H}x{W} scale ({s0},{s1}) ratio ({r0},{r1}): torch {ref} vs {box}"
            t, l, h, w = box["box"]
            fracs += [t / (H - h)] if H - h > 8 else []
            fracs += [l / (W - w)] if W - w > 8 else []
    assert len(fracs) > 80 and 0.4 < np.mean(fracs) < 0.6 and np.std(fracs) > 0.2, \
        f"box offsets not uniform: n {len(fracs)} mean {np.mean(fracs)} std {np.std(fracs)}"
    # A box no attempt can fit: the fallback centre crop, clamped to ratio 4/3.
    res = dc_json("rrc", 4, 400, 1, 0.08, 1.0, 3 / 4, 4 / 3, 1)
    assert res["boxes"][0]["box"] == [0, 197, 4, 5], res


def test_erasing_vs_torchvision():
    """erase_box follows RandomErasing.get_params: torchvision fed the same draws chooses the
    same box, or none when no attempt fits."""
    import torchvision.transforms as T
    n_none = 0
    for (H, W, s0, s1, r0, r1) in [(32, 32, 0.02, 0.33, 0.3, 3.3), (56, 40, 0.02, 0.33, 0.3, 3.3),
                                   (8, 30, 0.1, 0.9, 0.3, 3.3), (6, 6, 0.5, 1.0, 0.5, 2.0),
                                   (4, 4, 0.9, 1.0, 0.9, 1.1)]:
        res = dc_json("erase", H, W, 77, s0, s1, r0, r1, 40)
        r0f, r1f = res["ratio"]
        for box in res["boxes"]:
            draws = [v for pair in box["draws"] for v in pair]
            top, left, h, w = box["box"]

            with fed_draws(draws, [top, left]):
                ref = T.RandomErasing.get_params(torch.zeros(1, H, W), [s0, s1], [r0f, r1f], [0.0])
            if h == 0:   # no attempt fit: torchvision returns the whole image unchanged
                n_none += 1
                assert list(ref[:4]) == [0, 0, H, W], (H, W, ref[:4])
            else:
                assert list(ref[:4]) == box["box"], f"{H}x{W}: torch {ref[:4]} vs {box}"
    assert n_none >= 40, "the no-fit path was not exercised"


# ------------------------------------------------------------------ single images (predict)

def test_image_load_vs_torchvision():
    from PIL import Image
    rs = np.random.RandomState(8)
    d = tmpdir()
    rgb = rs.randint(0, 256, size=(300, 260, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(f"{d}/a.png")
    dc("image", f"{d}/a.png", f"{d}/out", 256, "imagenet")
    got = torch.from_numpy(np.fromfile(f"{d}/out", dtype=np.float32).reshape(3, 224, 224))
    # torchvision on the tensor: Resize(256, antialias) + CenterCrop(224), uint8 rounding, Normalize.
    t = torch.from_numpy(rgb).permute(2, 0, 1).float()[None]
    nh, nw = int(256 * 300 / 260), 256
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    t = t.round().clamp(0, 255)
    top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
    t = t[:, top:top + 224, left:left + 224] / 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    ref = (t - mean) / std
    err = (got - ref).abs().max().item()
    assert err <= 1.01 / 255 / 0.224, f"imagenet preset: max abs err {err}"
    # A colour image for a 1-channel 32x32 model: PIL convert("L"), resized as a whole.
    dc("image", f"{d}/a.png", f"{d}/g", 0, 1, 32, 32, 0.286, 0, 0, 0.353, 1, 1)
    got = torch.from_numpy(np.fromfile(f"{d}/g", dtype=np.float32).reshape(1, 32, 32))
    grey = torch.from_numpy(np.array(Image.fromarray(rgb).convert("L"))).float()[None, None]
    ref = (F.interpolate(grey, size=(32, 32), mode="bilinear", align_corners=False,
                         antialias=True)[0] / 255 - 0.286) / 0.353
    err = (got - ref).abs().max().item()
    assert err <= 1e-4, f"grey 32x32: max abs err {err}"
    # decode: exact RGB/grey planes.
    info = dc_json("decode", f"{d}/a.png", 3, f"{d}/raw")
    assert (info["H"], info["W"]) == (300, 260)
    raw = np.fromfile(f"{d}/raw", dtype=np.uint8).reshape(3, 300, 260)
    assert np.array_equal(raw.transpose(1, 2, 0), rgb)
    # Errors name the file.
    dc_error("image", f"{d}/missing.png", f"{d}/o", 256, "imagenet", must_name=f"{d}/missing.png")
    write(f"{d}/bad.jpg", b"\xff\xd8\xff\xe0 truncated jpeg")
    dc_error("image", f"{d}/bad.jpg", f"{d}/o", 256, "imagenet", must_name=f"{d}/bad.jpg")
    dc_error("image", f"{d}/a.png", f"{d}/o", 100, "imagenet", must_name=f"{d}/a.png")


def test_image_hostile_files():
    """Files crafted against the decoder: one error line, no memory error (SAN build)."""
    import io, zlib
    from PIL import Image
    rs = np.random.RandomState(9)
    d = tmpdir()
    rgb = rs.randint(0, 256, size=(20, 23, 3)).astype(np.uint8)
    for progressive in (False, True):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=80, progressive=progressive)
        good = buf.getvalue()
        path = f"{d}/ok.jpg"
        write(path, good)
        assert dc_json("decode", path, 3, f"{d}/raw") == {"H": 20, "W": 23}
        # Each Huffman table's 16 code counts made to add up past 256 (stb_image 2022-09
        # writes past its tables there): every DHT segment in turn, the progressive file's
        # later ones sitting between scans.
        at = [i for i in range(len(good) - 1) if good[i:i + 2] == b"\xff\xc4"]
        assert len(at) >= (3 if progressive else 2), at
        for i in at:
            counts = i + 5              # marker, length (2), class/slot, then the counts
            bad = good[:counts] + b"\xff" * 16 + good[counts + 16:]
            write(path, bad)
            line = dc_error("decode", path, 3, f"{d}/raw", must_name=path)
            assert "Huffman" in line, line
            write(path, bad[:counts + 5])   # cut inside the counts: the rest read as 0
            line = dc_error("decode", path, 3, f"{d}/raw", must_name=path)
            assert "Huffman" in line, line
    # An unknown critical PNG chunk whose name holds a newline: stb copies the name into its
    # message, which must stay one line.
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    png = buf.getvalue()
    body = b"A\nBC" + b"xy"
    chunk = struct.pack(">I", 2) + body + struct.pack(">I", zlib.crc32(body))
    path = f"{d}/odd.png"
    write(path, png[:33] + chunk + png[33:])   # after IHDR (8 + 25 bytes)
    line = dc_error("decode", path, 3, f"{d}/raw", must_name=path)
    assert "A?BC" in line, line
