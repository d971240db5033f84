"""`incept train`, `eval` and `predict` on real Fashion-MNIST subsets, checked against PyTorch
(torchvision's GoogLeNet, torch.optim.SGD, softmax top-5) and against themselves (exact resume),
plus every bad-input case: one clear line naming the file, exit 1 (2 for usage), nothing
half-written."""
import csv, gzip, math, os, pty, re, shutil, signal, subprocess, struct, time, zlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from common import BIN, ROOT, assert_close, rel_err, run, st_load, st_save, tmpdir

FASHION = "/usr/share/datasets/fashion-mnist"
HEADER = "epoch,lr,train_loss,train_acc,test_loss,test_acc1,test_acc5,images_per_s,seconds"


# ---------------------------------------------------------------- helpers

def idx_read(name):
    with gzip.open(os.path.join(FASHION, name)) as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


_data = {}


def fashion(split, n):
    """The first n images (uint8 N x 28 x 28) and labels of a split, read here with numpy."""
    if split not in _data:
        pre = "train" if split == "train" else "t10k"
        _data[split] = (idx_read(f"{pre}-images-idx3-ubyte.gz"), idx_read(f"{pre}-labels-idx1-ubyte.gz"))
    x, y = _data[split]
    return x[:n], torch.from_numpy(y[:n].astype(np.int64))


def to_input(imgs, meta, size):
    """torchvision's ToTensor -> Resize (bilinear, no antialias: upsampling) -> Normalize."""
    x = torch.from_numpy(np.asarray(imgs, dtype=np.float32) / 255.0).unsqueeze(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = float(meta["preprocess.mean"].split(",")[0])
    std = float(meta["preprocess.std"].split(",")[0])
    return (x - mean) / std


def tv_googlenet(aux, classes=10, in_channels=1):
    m = torchvision.models.googlenet(weights=None, aux_logits=aux, init_weights=False,
                                     num_classes=classes, dropout=0.0, dropout_aux=0.0)
    if in_channels != 3:
        m.conv1.conv = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return m


def load_checkpoint(model, path):
    """What the README tells a PyTorch user to do: drop incept.* keys, load strictly."""
    sd, meta = st_load(path, with_meta=True)
    weights = {k: v for k, v in sd.items() if not k.startswith("incept.")}
    model.load_state_dict(weights, strict=True)
    return sd, meta


def train(args, rc=0, cwd=None):
    p = subprocess.run([BIN, "train"] + [str(a) for a in args], capture_output=True, text=True,
                       timeout=600, cwd=cwd)
    if rc is not None and p.returncode != rc:
        raise AssertionError(f"incept train {' '.join(map(str, args))}: exit {p.returncode}, wanted "
                             f"{rc}; stderr: {p.stderr.strip()[-1500:]}")
    return p.stdout, p.stderr


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == HEADER, lines[0]
    return [dict(zip(HEADER.split(","), map(float, l.split(",")))) for l in lines[1:]]


def one_error_line(err, *must_name):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    for s in must_name:
        assert s in lines[0], f"error line does not name {s!r}: {lines[0]!r}"
    return lines[0]


def png_size(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    w, h = struct.unpack(">II", data[16:24])
    # every chunk's CRC must be right: the file is complete
    pos = 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        chunk = data[pos + 4:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(chunk) == crc, f"{path}: bad CRC in {chunk[:4]!r}"
        pos += 12 + n
    return w, h


# ---------------------------------------------------------------- one real short run, shared

SHORT = ["googlenet", "--data", "fashion-mnist", "--no-aux", "--limit-train", 2048,
         "--limit-test", 1000, "--epochs", 3, "--batch-size", 32, "--lr", 0.0125, "--seed", 5]
_short = {}


def short_run():
    if not _short:
        d = os.path.join(tmpdir(), "run")
        out, _ = train(SHORT + ["--run-dir", d])
        _short.update(dir=d, out=out)
    return _short


def test_short_training_learns():
    r = short_run()
    rows = metrics(r["dir"])
    assert [int(x["epoch"]) for x in rows] == [1, 2, 3]
    first, last = rows[0], rows[-1]
    assert last["train_loss"] < 0.75 * first["train_loss"], (first, last)
    assert last["test_loss"] < first["test_loss"], (first, last)
    assert last["test_acc1"] > 50 and last["train_acc"] > 45, last   # chance is 10 %
    assert all(x["images_per_s"] > 0 and x["seconds"] > 0 for x in rows)
    # the cosine schedule (one epoch of warmup, per step) ends near 0
    assert rows[0]["lr"] > rows[1]["lr"] > rows[2]["lr"] and rows[2]["lr"] < 1e-4 * 0.0125 * 10
    assert "epoch 3/3" in r["out"] and "T-shirt/top" in r["out"] and r["dir"] in r["out"]


def test_run_dir_files():
    d = short_run()["dir"]
    assert sorted(os.listdir(d)) == ["args.txt", "best.safetensors", "confusion.csv", "curves.png",
                                     "last.safetensors", "metrics.csv"]
    assert png_size(os.path.join(d, "curves.png")) == (1280, 600)
    with open(os.path.join(d, "confusion.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                           "Sneaker", "Bag", "Ankle boot"]
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    _, labels = fashion("test", 1000)
    assert counts.shape == (10, 10) and counts.sum() == 1000
    assert (counts.sum(1) == np.bincount(labels.numpy(), minlength=10)).all()
    last = metrics(d)[-1]
    assert abs(100.0 * np.trace(counts) / 1000 - last["test_acc1"]) < 1e-3
    with open(os.path.join(d, "args.txt")) as f:
        args = f.read()
    assert args.startswith("command (") and "--limit-train 2048" in args and "train.seed = 5" in args


def test_checkpoints_load_in_torchvision():
    d = short_run()["dir"]
    rows = metrics(d)
    best_epoch = max(range(3), key=lambda i: (rows[i]["test_acc1"], -i)) + 1
    for name in ["last", "best"]:
        m = tv_googlenet(aux=False)
        sd, meta = load_checkpoint(m, os.path.join(d, f"{name}.safetensors"))
        assert meta["model"] == "googlenet" and meta["format"] == "incept-train-1"
        assert meta["data"] == "fashion-mnist" and meta["model.in_channels"] == "1"
        assert meta["preprocess.height"] == "32" and meta["optim"] == "sgd"
        assert eval(meta["classes"])[9] == "Ankle boot"
        epoch = int(sd["incept.epoch"])
        assert epoch == (3 if name == "last" else best_epoch)
        assert int(sd["incept.optim.step"]) == epoch * 64
        assert sd["incept.metrics"].shape == (epoch, 9)
        n_floats = sum(v.numel() for k, v in sd.items()
                       if not k.startswith("incept.") and v.dtype == torch.float32)
        assert sd["incept.optim.momentum_buffer"].shape == (n_floats,)


def eval_torch(path, n, aux=False):
    m = tv_googlenet(aux=aux)
    _, meta = load_checkpoint(m, path)
    m.eval()
    imgs, y = fashion("test", n)
    with torch.no_grad():
        logits = m(to_input(imgs, meta, int(meta["preprocess.height"])))
    loss = F.cross_entropy(logits, y).item()
    top1 = (logits.argmax(1) == y).sum().item()
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).sum().item()
    return loss, top1, top5, logits


def test_eval_flip_tta_matches_pytorch():
    """--tta scores each image by the mean softmax of it and its mirror image."""
    d = short_run()["dir"]
    w = os.path.join(d, "best.safetensors")
    out, _ = run(["eval", "googlenet", "--weights", w, "--data", "fashion-mnist", "--limit-test", 300,
                  "--batch-size", 64, "--tta"])
    m = re.search(r"loss ([\d.]+)  top-1 [\d.]+% \((\d+)/300\)  top-5 [\d.]+% \((\d+)/300\)", out)
    assert m and "mirror" in out, out
    net = tv_googlenet(aux=False)
    _, meta = load_checkpoint(net, w)
    net.eval()
    imgs, y = fashion("test", 300)
    x = to_input(imgs, meta, int(meta["preprocess.height"]))
    with torch.no_grad():
        p = (F.softmax(net(x), 1) + F.softmax(net(torch.flip(x, [3])), 1)) / 2
    loss = -torch.log(p[torch.arange(300), y]).mean().item()
    top1 = (p.argmax(1) == y).sum().item()
    top5 = (p.topk(5, 1).indices == y[:, None]).any(1).sum().item()
    assert abs(float(m.group(1)) - loss) <= 1e-4 * max(1, loss), (m.group(1), loss)
    assert abs(int(m.group(2)) - top1) <= 1 and abs(int(m.group(3)) - top5) <= 1, (m.groups(), top1, top5)
    # a plain evaluation of the same images differs (else the flip would not be tested)
    plain, _ = run(["eval", "googlenet", "--weights", w, "--data", "fashion-mnist", "--limit-test", 300])
    assert re.search(r"loss ([\d.]+)", plain).group(1) != m.group(1)


def test_eval_matches_pytorch():
    d = short_run()["dir"]
    w = os.path.join(d, "best.safetensors")
    csv_out = os.path.join(tmpdir(), "conf.csv")
    out, _ = run(["eval", "googlenet", "--weights", w, "--data", "fashion-mnist", "--limit-test", 700,
                  "--batch-size", 64, "--output", csv_out])
    m = re.search(r"loss ([\d.]+)  top-1 [\d.]+% \((\d+)/700\)  top-5 [\d.]+% \((\d+)/700\)", out)
    assert m, out
    loss, top1, top5, _ = eval_torch(w, 700)
    assert abs(float(m.group(1)) - loss) <= 1e-4 * max(1, loss), (m.group(1), loss)
    assert abs(int(m.group(2)) - top1) <= 1 and abs(int(m.group(3)) - top5) <= 1, (m.groups(), top1, top5)
    assert "Ankle boot" in out and "confusion matrix" in out
    with open(csv_out) as f:
        assert sum(int(v) for r in list(csv.reader(f))[1:] for v in r[1:]) == 700
    # the last epoch's numbers in metrics.csv are the same evaluation (on 1000 images)
    last = metrics(d)[-1]
    loss, top1, top5, _ = eval_torch(os.path.join(d, "last.safetensors"), 1000)
    assert abs(last["test_loss"] - loss) <= 1e-4 * max(1, loss)
    assert abs(last["test_acc1"] - top1 / 10) <= 0.1 and abs(last["test_acc5"] - top5 / 10) <= 0.1


def png_write(path, img):
    """A grey 8-bit PNG written here (no incept code involved)."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))
    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_predict_matches_pytorch():
    d = short_run()["dir"]
    w = os.path.join(d, "best.safetensors")
    tmp = tmpdir()
    imgs, _ = fashion("test", 3)
    paths = []
    for i in range(3):
        paths.append(os.path.join(tmp, f"img{i}.png"))
        png_write(paths[-1], imgs[i])
    out, _ = run(["predict", "googlenet", "--weights", w] + paths)
    _, _, _, logits = eval_torch(w, 3)
    probs = logits.softmax(1)
    blocks = out.strip().split("\n")
    names = eval(st_load(w, with_meta=True)[1]["classes"])
    for i in range(3):
        block = blocks[6 * i:6 * i + 6]
        assert block[0] == paths[i]
        ref = probs[i].topk(5)
        for j in range(5):
            m = re.fullmatch(r"  ([\d.]+)  (.+) \((\d+)\)", block[1 + j])
            assert m, block[1 + j]
            k = int(m.group(3))
            assert k == ref.indices[j].item() or abs(ref.values[j].item() - probs[i, k].item()) < 1e-5
            assert abs(float(m.group(1)) - probs[i, k].item()) < 2e-5 and m.group(2) == names[k]
    # --bf16: the same format, probabilities within bfloat16's rounding of PyTorch's
    out16, _ = run(["predict", "googlenet", "--weights", w, "--bf16"] + paths)
    lines16 = out16.strip().split("\n")
    assert len(lines16) == 18 and out16 != out, out16
    for i in range(3):
        for line in lines16[6 * i + 1:6 * i + 6]:
            m = re.fullmatch(r"  ([\d.]+)  (.+) \((\d+)\)", line)
            assert m and abs(float(m.group(1)) - probs[i, int(m.group(3))].item()) < 2e-2, line


# ---------------------------------------------------------------- one step against torch.optim

def kink_free(model, seed):
    """Weights that keep every ReLU input and max-pool choice away from ties (as in
    test_models.randomize): at torchvision's own init a single step's gradients move by
    percents between float32 and float64 PyTorch, at these they agree to ~1e-3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.25 * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.5 + 0.1 * torch.rand(m.bias.shape, generator=g))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.15 * (1 + 0.2 * torch.randn(m.num_features, generator=g)))
                m.bias.copy_(0.5 + 0.1 * torch.rand(m.num_features, generator=g))
    return model


def one_step(extra=()):
    """One SGD step of the default recipe (nesterov, weight decay without BN/bias, label
    smoothing, main + 0.3 x aux losses) by incept from kink-free weights on a fixed batch.
    Returns (new weights, initial weights, the run directory, a function giving PyTorch's new
    weights for a given aux weight (float64, or as asked), and its plain loss and accuracy)."""
    tmp = tmpdir()
    init = os.path.join(tmp, "init.safetensors")
    st_save(init, kink_free(tv_googlenet(aux=True), 3).state_dict())
    d = os.path.join(tmp, "run")
    B, lr = 24, 0.2
    train(["googlenet", "--data", "fashion-mnist", "--limit-train", B, "--batch-size", B,
           "--limit-test", 32, "--epochs", 1, "--no-augment", "--dropout", 0, "--dropout-aux", 0,
           "--init-weights", init, "--schedule", "constant", "--warmup", 0, "--lr", lr,
           "--run-dir", d] + list(extra))
    got, meta = st_load(os.path.join(d, "last.safetensors"), with_meta=True)
    imgs, y = fashion("train", B)
    x = to_input(imgs, meta, 32)

    def torch_step(aux_weight, dtype=torch.float64, bf16_autocast=False):
        m = tv_googlenet(aux=True)
        load_checkpoint(m, init)
        m = m.to(dtype).train()
        decay, no_decay = [], []
        for mod in m.modules():
            for pn, p in mod.named_parameters(recurse=False):
                (no_decay if isinstance(mod, nn.BatchNorm2d) or pn == "bias" else decay).append(p)
        opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, momentum=0.9, nesterov=True)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            out = m(x.to(dtype))
            ce = lambda z: F.cross_entropy(z.to(dtype), y, label_smoothing=0.1)
            loss = ce(out.logits) + aux_weight * (ce(out.aux_logits1) + ce(out.aux_logits2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        plain = F.cross_entropy(out.logits, y).item()
        acc = (out.logits.argmax(1) == y).double().mean().item() * 100
        return dict(m.state_dict()), plain, acc

    return got, st_load(init), d, torch_step


def update_errors(got, start, ref):
    """Worst relative error of the updates (new - initial weights, not the much larger weights
    themselves) and of the BN running statistics; checks num_batches_tracked."""
    worst_update, worst_running = 0.0, 0.0
    for k, v in ref.items():
        if k.endswith("num_batches_tracked"):
            assert int(got[k]) == int(v) == 1, k
        elif "running" in k:
            worst_running = max(worst_running, rel_err(got[k], v))
        else:
            worst_update = max(worst_update, rel_err(got[k] - start[k], v - start[k].double()))
    return worst_update, worst_running


def update_l2_error(got, start, ref):
    """|update - reference update| / |reference update| over all parameters together."""
    num = den = 0.0
    for k, v in ref.items():
        if k.endswith("num_batches_tracked") or "running" in k:
            continue
        u = v.double() - start[k].double()
        num += ((got[k].double() - start[k].double() - u) ** 2).sum().item()
        den += (u ** 2).sum().item()
    return math.sqrt(num / den)


def test_one_step_matches_pytorch_with_aux():
    """A single SGD step of the default recipe from the same initial weights and batch: incept's
    new weights equal torch.optim's (float64). The same check without the aux terms must fail."""
    got, start, d, torch_step = one_step()
    ref, plain, acc = torch_step(0.3)
    upd, run = update_errors(got, start, ref)
    assert upd <= 5e-3 and run <= 1e-5, (upd, run)
    # the reported training loss and accuracy are the main head's plain cross-entropy on that batch
    row = metrics(d)[0]
    assert abs(row["train_loss"] - plain) < 1e-5 * max(1, plain), (row["train_loss"], plain)
    assert abs(row["train_acc"] - acc) < 1e-3
    # without the aux terms the updates differ clearly: the check above can fail
    ref0, _, _ = torch_step(0.0)
    k = "inception4a.branch1.conv.weight"
    assert rel_err(got[k] - start[k], ref0[k] - start[k].double()) > 0.05


def test_one_step_bf16_near_pytorch():
    """--bf16 (bfloat16 products, float32 sums): the same step against PyTorch's float64 one is
    no further off than PyTorch's own bfloat16 autocast of that step (torch.autocast on the CPU,
    which also rounds the convolutions' outputs), and clearly further than float32 (the mode is
    on); the checkpoint records the mode. (This step is hard on low precision: the kink-free
    weights keep every ReLU open, so training-mode BN's mean removal cancels most of each
    gradient, and updates of ~1e-4 in 4b/4c are 50-100 % off in both.)"""
    got, start, d, torch_step = one_step(["--bf16"])
    ref, _, _ = torch_step(0.3)
    ours = update_l2_error(got, start, ref)
    amp = update_l2_error(torch_step(0.3, torch.float32, True)[0], start, ref)
    f32 = update_l2_error(torch_step(0.3, torch.float32)[0], start, ref)
    print(f"update error vs float64: incept --bf16 {ours:.3g}, PyTorch bf16 autocast {amp:.3g}, "
          f"PyTorch float32 {f32:.3g}")
    assert ours <= amp and ours > 100 * f32, (ours, amp, f32)
    _, meta = st_load(os.path.join(d, "last.safetensors"), with_meta=True)
    assert meta["train.bf16"] == "1"


# ---------------------------------------------------------------- exact resume, determinism

TINY = ["googlenet", "--data", "fashion-mnist", "--limit-train", 192, "--batch-size", 32,
        "--limit-test", 64, "--epochs", 2, "--lr", 0.02]


def test_precise_bn_matches_update_bn():
    """--precise-bn N: after the last epoch's steps, batch norm's running statistics (main path
    and aux heads) are what torch.optim.swa_utils.update_bn computes from the trained weights
    over N un-augmented training batches, batch k holding images (j*N + k) * n // (N*B),
    j < B; the last test accuracy is then that model's (eval mode); earlier epochs keep the
    momentum's statistics."""
    tmp = tmpdir()
    d = os.path.join(tmp, "run")
    n, B, nb = 64, 16, 3
    train(["googlenet", "--data", "fashion-mnist", "--limit-train", n, "--batch-size", B,
           "--limit-test", 200, "--epochs", 2, "--lr", 0.02, "--precise-bn", nb, "--run-dir", d,
           "--stop-after", 1])
    first = st_load(os.path.join(d, "last.safetensors"))   # the momentum's: n/B steps tracked
    assert int(first["conv1.bn.num_batches_tracked"]) == n // B
    train(["--resume", d])   # (the option is kept in the checkpoint)
    got, meta = st_load(os.path.join(d, "last.safetensors"), with_meta=True)
    assert meta["train.precise_bn"] == str(nb)
    m = tv_googlenet(aux=True)
    load_checkpoint(m, os.path.join(d, "last.safetensors"))
    m = m.double()
    imgs, _ = fashion("train", n)
    loader = [to_input(imgs[[(j * nb + k) * n // (nb * B) for j in range(B)]], meta, 32).double()
              for k in range(nb)]
    torch.optim.swa_utils.update_bn(loader, m)
    ref = m.state_dict()
    worst, count = 0.0, 0
    for k, v in ref.items():
        if k.endswith("num_batches_tracked"):
            assert int(got[k]) == nb, (k, int(got[k]))
            count += 1
        elif "running" in k:
            worst = max(worst, assert_close(got[k], v, 2e-4, k))
    assert count == 59, count   # 57 BasicConv2d of the main path + one per aux head
    # the reported test accuracy is the model's with these statistics
    x, y = fashion("test", 200)
    m.eval()
    with torch.no_grad():
        acc = (m(to_input(x, meta, 32).double()).argmax(1) == y).double().mean().item() * 100
    assert abs(metrics(d)[1]["test_acc1"] - acc) <= 0.5 + 1e-9, (metrics(d)[1], acc)
    print(f"running statistics vs update_bn: worst relative error {worst:.2g}")


def same_checkpoint(a, b):
    ta, ma = st_load(a, with_meta=True)
    tb, mb = st_load(b, with_meta=True)
    assert ma == mb and sorted(ta) == sorted(tb)
    for k in ta:
        x, y = ta[k], tb[k]
        if k == "incept.metrics":   # the last two columns are img/s and seconds
            x, y = x[:, :7], y[:, :7]
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f"{k} differs"


def test_resume_is_bit_exact():
    """2 epochs in one go == 1 epoch, stop, --resume, 1 more epoch (aux heads and dropout on,
    augmentation with random erasing, precise BN); the run directory's default name; a
    different seed changes the run."""
    tmp = tmpdir()
    one = os.path.join(tmp, "one")
    erase = ["--random-erasing", 0.5, "--precise-bn", 2]
    train(TINY + erase + ["--run-dir", one])
    # default run directory runs/<model>-<data>-<timestamp>, relative to the working directory
    out, _ = train(TINY + erase + ["--stop-after", 1], cwd=tmp)
    made = os.listdir(os.path.join(tmp, "runs"))
    assert len(made) == 1 and re.fullmatch(r"googlenet-fashion-mnist-\d{8}-\d{6}", made[0]), made
    two = os.path.join(tmp, "runs", made[0])
    assert "--stop-after" in out and len(metrics(two)) == 1
    first = os.path.join(tmp, "epoch1.safetensors")
    os.rename(os.path.join(two, "last.safetensors"), first)
    os.link(first, os.path.join(two, "last.safetensors"))
    out, _ = train(["--resume", two])
    assert "resuming googlenet" in out and "epoch 2/2" in out
    same_checkpoint(os.path.join(one, "last.safetensors"), os.path.join(two, "last.safetensors"))
    same_checkpoint(os.path.join(one, "best.safetensors"), os.path.join(two, "best.safetensors"))
    for a, b in zip(metrics(one), metrics(two)):
        assert list(a.values())[:7] == list(b.values())[:7]
    with open(os.path.join(two, "args.txt")) as f:
        cmds = [l for l in f if l.startswith("command")]
    assert len(cmds) == 2 and "resumed" in cmds[1] and "--resume" in cmds[1]
    # resuming a finished run does nothing; --epochs extends it
    out, _ = train(["googlenet", "--data", "fashion-mnist", "--resume", two])   # as `make run` passes it
    assert "complete" in out
    # another seed: other shuffles, augmentation, dropout and init
    other = os.path.join(tmp, "other")
    train(TINY + ["--seed", 9, "--stop-after", 1, "--run-dir", other])
    a, b = st_load(first), st_load(os.path.join(other, "last.safetensors"))
    assert not torch.equal(a["fc.weight"], b["fc.weight"])


def test_resume_is_bit_exact_bf16():
    """The same with --bf16 (recorded in the checkpoint, so --resume continues in it)."""
    tmp = tmpdir()
    one, two = os.path.join(tmp, "one"), os.path.join(tmp, "two")
    train(TINY + ["--bf16", "--run-dir", one])
    train(TINY + ["--bf16", "--stop-after", 1, "--run-dir", two])
    epoch1 = st_load(os.path.join(two, "last.safetensors"))
    train(["--resume", two])
    same_checkpoint(os.path.join(one, "last.safetensors"), os.path.join(two, "last.safetensors"))
    # the float32 run's first epoch differs: the mode is on
    plain = os.path.join(tmp, "plain")
    train(TINY + ["--stop-after", 1, "--run-dir", plain])
    assert not torch.equal(st_load(os.path.join(plain, "last.safetensors"))["fc.weight"],
                           epoch1["fc.weight"])


def test_bf16_test_pass_near_pytorch():
    """--bf16: each epoch's test pass runs in the mode too (on AMX, the folded convolutions'
    GEMMs on tiles, merged 1x1 groups included); its loss and top-1 in metrics.csv stay within
    bfloat16's rounding of torchvision's float32 evaluation of the same checkpoint, and so does
    `incept eval --bf16`'s. The weights are the short run's (~70 % top-1: logits that a wrong
    channel would change), trained one more epoch at a negligible learning rate."""
    d = os.path.join(tmpdir(), "bf16")
    train(["googlenet", "--data", "fashion-mnist", "--no-aux", "--limit-train", 256, "--limit-test",
           500, "--batch-size", 32, "--epochs", 1, "--lr", 1e-6, "--bf16", "--init-weights",
           os.path.join(short_run()["dir"], "best.safetensors"), "--run-dir", d])
    last = metrics(d)[-1]
    loss, top1, _, _ = eval_torch(os.path.join(d, "last.safetensors"), 500)
    print(f"test loss {last['test_loss']:.5f} (PyTorch float32 {loss:.5f}), "
          f"top-1 {last['test_acc1']:.1f} % ({top1 / 5:.1f} %)")
    assert abs(last["test_loss"] - loss) <= 0.01 * max(1, loss), (last, loss)
    assert abs(last["test_acc1"] - top1 / 5) <= 1.0, (last, top1)
    # `incept eval --bf16` runs the same mode: as near, and not the float32 evaluation
    w = os.path.join(d, "last.safetensors")
    ev = ["eval", "googlenet", "--weights", w, "--data", "fashion-mnist", "--limit-test", 500]
    out, _ = run(ev + ["--bf16"])
    plain, _ = run(ev)
    pat = r"loss ([\d.]+)  top-1 [\d.]+% \((\d+)/500\)"
    m, p = re.search(pat, out), re.search(pat, plain)
    assert m and p and "bfloat16 products" in out and "bfloat16" not in plain, (out, plain)
    print(f"eval --bf16: loss {m.group(1)}, top-1 {m.group(2)}/500; float32 {p.group(1)}, {p.group(2)}/500")
    assert abs(float(m.group(1)) - loss) <= 0.01 * max(1, loss), (m.group(1), loss)
    assert abs(int(m.group(2)) - top1) <= 5, (m.group(2), top1)
    assert m.group(1) != p.group(1), (m.group(1), p.group(1))


def test_time_budget_fixes_the_length():
    """--time-budget: when the warmup epoch ends the run becomes the epochs that fit, exactly as
    if --epochs had said so from the start; --epochs is the ceiling, and at least one epoch
    follows the warmup. The checkpoints record the length, not the budget (so --resume goes on
    to it)."""
    tmp = tmpdir()
    base = TINY + ["--precise-bn", 2]
    roomy, spent, plain = (os.path.join(tmp, d) for d in ("roomy", "spent", "plain"))
    out, _ = train(base + ["--time-budget", "1000h", "--epochs", 3, "--run-dir", roomy])
    assert "at most 3" in out and "time budget: 3 epochs" in out and "epoch 3/3" in out, out
    assert len(metrics(roomy)) == 3
    out, _ = train(base + ["--time-budget", "0.01", "--epochs", 5, "--run-dir", spent])
    assert "time budget: 2 epochs" in out and "epoch 2/2" in out, out
    train(base + ["--epochs", 2, "--run-dir", plain])
    same_checkpoint(os.path.join(spent, "last.safetensors"), os.path.join(plain, "last.safetensors"))
    with open(os.path.join(spent, "args.txt")) as f:
        args = f.read()
    assert args.count("command") == 1 and "--time-budget" in args, args
    assert "train.epochs = 2\n" in args and "train.time_budget = 0\n" in args, args
    out, _ = train(["--resume", spent])
    assert "complete" in out


def run_paused(args, after, seconds):
    """incept train ARGS, stopped for real (SIGSTOP) for `seconds` just after the stdout line
    that starts with `after`, then run to the end; returns all its stdout."""
    p = subprocess.Popen([BIN, "train"] + [str(a) for a in args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    head = ""
    try:
        for line in p.stdout:
            head += line
            if line.startswith(after):
                break
        time.sleep(0.05)
        p.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        p.send_signal(signal.SIGCONT)
        out, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    return head + out


def budget_changes(out):
    """The time budget's changes of length after the decision: [(cut|lengthened, to, from)]."""
    return [(k, int(a), int(b)) for k, a, b in
            re.findall(r"time budget: (cut|lengthened) to (\d+) epochs from (\d+)", out)]


def ended_at(d, out, n):
    """The run stopped at its new length n, recorded it, and --resume finds it complete."""
    assert f"epoch {n}/{n}" in out and f"epoch {n + 1}/" not in out, out
    assert len(metrics(d)) == n
    with open(os.path.join(d, "args.txt")) as f:
        assert f"train.epochs = {n}\n" in f.read()
    out, _ = train(["--resume", d])
    assert "complete" in out


def test_time_budget_cuts_a_run_that_slows_down():
    """--time-budget: when, after the decision, the epochs left no longer fit (the host slowed
    down), the run is cut to what fits: at least one more epoch, recorded in args.txt and the
    checkpoints (so --resume finds the run complete). The slowdown is real: the process is
    stopped (SIGSTOP) for 9 s at the start of epoch 2. The budget, 30 s, leaves room for at least
    4 epochs at the decision unless epoch 1 takes over ~5 s (it takes ~4 s under the
    sanitizers); after the stop, 6 more epochs never fit, so the ceiling of 8 or less is cut."""
    d = os.path.join(tmpdir(), "run")
    out = run_paused(TINY + ["--precise-bn", 2, "--time-budget", 30, "--epochs", 8, "--run-dir", d],
                     "time budget:", 9)   # the decision is printed when epoch 1 is done
    m = re.search(r"time budget: (\d+) epochs", out)
    assert m and int(m.group(1)) >= 4, out   # room for a cut to 3
    changes = budget_changes(out)
    assert changes and changes[0][0] == "cut" and changes[0][2] == int(m.group(1)), out
    assert 3 <= changes[0][1] < int(m.group(1)), out
    # (a quick machine may lengthen the run again once two epochs after the stop were quick)
    ended_at(d, out, changes[-1][1])


def test_time_budget_lengthens_a_run_that_speeds_up():
    """--time-budget: when, after the decision, the last two epochs were both quick enough that
    more epochs fit (the host sped up), the run is lengthened, up to the --epochs ceiling, and the
    new length recorded. Here epoch 1 is made slow for real (SIGSTOP for 6 s just after the
    header): the decision then sees a ~7 s epoch (~10 s under the sanitizers) and takes ~8 (~5)
    epochs of the 60 s; epochs 2 and 3 take ~0.7 s (~4 s), so after epoch 3 the ceiling of 12
    (11 or so) fits."""
    d = os.path.join(tmpdir(), "run")
    out = run_paused(TINY + ["--precise-bn", 2, "--time-budget", 60, "--epochs", 12, "--run-dir", d],
                     "sgd lr", 6)   # the header's last line is printed as epoch 1 begins
    m = re.search(r"time budget: (\d+) epochs", out)
    assert m and 4 <= int(m.group(1)) < 12, out   # room to lengthen after epoch 3
    changes = budget_changes(out)
    assert changes and changes[0][0] == "lengthened" and changes[0][2] == int(m.group(1)), out
    assert int(m.group(1)) < changes[0][1] <= 12, out
    ended_at(d, out, changes[-1][1])


def test_nan_stops_training():
    tmp = tmpdir()
    # epoch 1 is fine, epoch 2's lr (x 1e30) blows the weights up
    d = os.path.join(tmp, "blowup")
    _, err = train(TINY + ["--schedule", "step", "--step-size", 1, "--gamma", 1e30, "--warmup", 0,
                           "--run-dir", d], rc=1)
    line = one_error_line(err, "epoch 2", "training stopped", "last.safetensors (epoch 1)")
    assert re.search(r"(NaN|infinite)", line), line
    assert int(st_load(os.path.join(d, "last.safetensors"))["incept.epoch"]) == 1
    assert len(metrics(d)) == 1
    assert not [f for f in os.listdir(d) if ".tmp." in f]
    # in the first epoch: no checkpoint at all
    d = os.path.join(tmp, "first")
    _, err = train(TINY + ["--lr", 1e30, "--schedule", "constant", "--warmup", 0, "--run-dir", d], rc=1)
    line = one_error_line(err, "epoch 1, step", "no checkpoint was written")
    assert sorted(os.listdir(d)) == ["args.txt"]


def test_progress_bar_on_a_terminal():
    master, slave = pty.openpty()
    d = os.path.join(tmpdir(), "tty")
    p = subprocess.Popen([BIN, "train"] + [str(a) for a in TINY] + ["--epochs", "1", "--run-dir", d],
                         stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    out = p.communicate(timeout=300)[0]
    os.close(master)
    assert p.returncode == 0
    text = seen.decode()
    assert "\r" in text and "epoch 1/1 train [" in text and "img/s" in text and "<" in text, text
    assert "6/6" in text and "loss" in text and "acc" in text
    assert "epoch 1/1  lr" in out


# ---------------------------------------------------------------- plain torchvision weights

def test_eval_and_predict_plain_weights():
    """Weights without incept's metadata: eval takes the model options from the command line,
    predict uses torchvision's ImageNet preset and --labels."""
    tmp = tmpdir()
    w = os.path.join(tmp, "tv.safetensors")
    m = kink_free(tv_googlenet(aux=False), 7).eval()
    st_save(w, m.state_dict())
    out, _ = run(["eval", "googlenet", "--weights", w, "--data", "fashion-mnist", "--num-classes", 10,
                  "--in-channels", 1, "--no-aux", "--limit-test", 100])
    imgs, y = fashion("test", 100)
    with torch.no_grad():
        logits = m(to_input(imgs, {"preprocess.mean": "0.286", "preprocess.std": "0.353"}, 32))
    got = re.search(r"loss ([\d.]+)  top-1 [\d.]+% \((\d+)/100\)", out)
    assert abs(float(got.group(1)) - F.cross_entropy(logits, y).item()) < 1e-4
    assert abs(int(got.group(2)) - (logits.argmax(1) == y).sum().item()) <= 1

    rgb = kink_free(torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False), 8).eval()
    w = os.path.join(tmp, "rgb.safetensors")
    st_save(w, rgb.state_dict())
    from PIL import Image
    rs = np.random.RandomState(0)
    img = os.path.join(tmp, "photo.png")
    Image.fromarray(rs.randint(0, 256, (300, 260, 3), dtype=np.uint8)).save(img)
    labels = os.path.join(tmp, "labels.txt")
    with open(labels, "w") as f:
        f.write("".join(f"name {i}\n" for i in range(1000)))
    out, _ = run(["predict", "googlenet", "--weights", w, "--labels", labels, "--no-aux", img])
    tf = torchvision.transforms
    pipe = tf.Compose([tf.Resize(256), tf.CenterCrop(224), tf.ToTensor(),
                       tf.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        probs = rgb(pipe(Image.open(img).convert("RGB"))[None]).softmax(1)[0]
    lines = out.strip().split("\n")
    assert lines[0] == img and len(lines) == 6
    kth = probs.topk(5).values[-1].item()
    for l in lines[1:]:
        m = re.fullmatch(r"  ([\d.]+)  name (\d+) \((\d+)\)", l)
        assert m and m.group(2) == m.group(3), l
        p = probs[int(m.group(3))].item()
        assert abs(float(m.group(1)) - p) < 2e-4 and p >= kth - 2e-4


# ---------------------------------------------------------------- bad input

def usage_error(args):
    _, err = run(args, rc=2)
    line = one_error_line(err)
    assert line.startswith("incept: "), line
    return line


def test_bad_flags_are_usage_errors():
    base = ["train", "googlenet", "--data", "fashion-mnist"]
    assert "MODEL" in usage_error(["train"])
    assert "nosuchnet" in usage_error(["train", "nosuchnet", "--data", "fashion-mnist"])
    assert "--data" in usage_error(["train", "googlenet"])
    assert "--batch-size" in usage_error(base + ["--batch-size", 1])
    assert "--lr" in usage_error(base + ["--lr", "abc"])
    assert "--epochs" in usage_error(base + ["--epochs", 0])
    assert "rmsprop" in usage_error(base + ["--optimizer", "rmsprop"])
    assert "wavy" in usage_error(base + ["--schedule", "wavy"])
    assert "--frobnicate" in usage_error(base + ["--frobnicate"])
    assert "--seed" in usage_error(base + ["--seed"])
    assert "SGD" in usage_error(base + ["--optimizer", "adam", "--momentum", 0.9])
    assert "warmup" in usage_error(base + ["--epochs", 2, "--warmup", 2])
    assert "--lr" in usage_error(["train", "--resume", tmpdir(), "--lr", 0.1])
    assert "--weights" in usage_error(["eval", "googlenet", "--data", "fashion-mnist"])
    assert "--data" in usage_error(["eval", "googlenet", "--weights", "w"])
    assert "IMAGE" in usage_error(["predict", "googlenet", "--weights", "w"])
    assert "--top" in usage_error(["predict", "googlenet", "--weights", "w", "--top", 0, "x.png"])
    assert "--random-erasing" in usage_error(base + ["--random-erasing", 1.5])
    assert "--no-augment" in usage_error(base + ["--random-erasing", 0.5, "--no-augment"])
    for bad in ("abc", "0", "-5m", "3d"):
        assert "--time-budget" in usage_error(base + ["--time-budget", bad])
    assert "ceiling" in usage_error(base + ["--time-budget", "1h", "--epochs", 1])
    assert "--time-budget" in usage_error(["train", "--resume", tmpdir(), "--time-budget", "1h"])


def write_idx(d, name, arr, magic):
    with gzip.open(os.path.join(d, name + ".gz"), "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes())


def fake_fashion(d, bad=None):
    os.makedirs(d)
    rs = np.random.RandomState(0)
    for pre, n in [("train", 40), ("t10k", 10)]:
        x = rs.randint(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rs.randint(0, 10, n).astype(np.uint8)
        if bad == "label" and pre == "t10k":
            y[3] = 12
        write_idx(d, f"{pre}-images-idx3-ubyte", x, 0x803 if bad != "magic" else 0x1234)
        write_idx(d, f"{pre}-labels-idx1-ubyte", y, 0x801)


def data_error(source, must_name):
    d = os.path.join(tmpdir(), "never")
    _, err = run(["train", "googlenet", "--data", source, "--run-dir", d, "--batch-size", 8], rc=1)
    one_error_line(err, must_name)
    assert not os.path.exists(d), "a run directory was created for bad data"


def test_bad_data_sources():
    tmp = tmpdir()
    data_error("nosuchset", "nosuchset")
    data_error("fashion-mnist:/nonexistent/dir", "/nonexistent/dir")
    fake_fashion(os.path.join(tmp, "magic"), bad="magic")
    data_error(f"fashion-mnist:{tmp}/magic", "train-images-idx3-ubyte")
    fake_fashion(os.path.join(tmp, "label"), bad="label")
    data_error(f"fashion-mnist:{tmp}/label", "t10k-labels-idx1-ubyte")
    os.makedirs(os.path.join(tmp, "empty", "train"))
    data_error(f"folder:{tmp}/empty", os.path.join(tmp, "empty"))
    os.makedirs(os.path.join(tmp, "noimg", "train", "cat"))
    os.makedirs(os.path.join(tmp, "noimg", "val", "cat"))
    data_error(f"folder:{tmp}/noimg", os.path.join(tmp, "noimg"))
    # a good fake set trains (proves the cases above fail for their own reason)
    fake_fashion(os.path.join(tmp, "good"))
    d = os.path.join(tmp, "ok")
    train(["googlenet", "--data", f"fashion-mnist:{tmp}/good", "--epochs", 1, "--batch-size", 8,
           "--run-dir", d, "--no-aux"])
    # too few images for one batch
    _, err = run(["train", "googlenet", "--data", f"fashion-mnist:{tmp}/good", "--batch-size", 64,
                  "--run-dir", os.path.join(tmp, "x")], rc=1)
    one_error_line(err, "40 images", "--batch-size")
    _, err = run(["eval", "googlenet", "--weights", os.path.join(d, "last.safetensors"),
                  "--data", "cifar10:/nonexistent"], rc=1)
    one_error_line(err, "/nonexistent")


def test_bad_resume_and_run_dirs():
    tmp = tmpdir()
    _, err = run(["train", "--resume", os.path.join(tmp, "missing")], rc=1)
    one_error_line(err, os.path.join(tmp, "missing"))
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty)
    _, err = run(["train", "--resume", empty], rc=1)
    one_error_line(err, os.path.join(empty, "last.safetensors"))
    corrupt = os.path.join(tmp, "corrupt")
    os.makedirs(corrupt)
    with open(os.path.join(corrupt, "last.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", 1 << 40) + b"{}")
    _, err = run(["train", "--resume", corrupt], rc=1)
    one_error_line(err, os.path.join(corrupt, "last.safetensors"))
    plain = os.path.join(tmp, "plain")
    os.makedirs(plain)
    st_save(os.path.join(plain, "last.safetensors"), {"x": torch.zeros(2)})
    _, err = run(["train", "--resume", plain], rc=1)
    one_error_line(err, os.path.join(plain, "last.safetensors"), "not a checkpoint")
    # a directory that already holds a run is never overwritten
    d = short_run()["dir"]
    before = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)}
    _, err = run(["train"] + SHORT + ["--run-dir", d], rc=1)
    one_error_line(err, d, "--resume")
    assert before == {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)}
    _, err = run(["train", "vgg11", "--resume", d], rc=1)
    one_error_line(err, d, "googlenet")
    _, err = run(["train", "googlenet", "--data", "mnist", "--resume", d], rc=1)
    one_error_line(err, d, "fashion-mnist", "mnist")
    # Lengths and sizes the CLI would refuse, in edited metadata (a batch of 2^30 once ended
    # in "out of memory", an epoch count of 2^30 trained on).
    sd, meta = st_load(os.path.join(d, "last.safetensors"), with_meta=True)
    for key, value, says in [("train.eval_batch_size", 1 << 30, "--eval-batch-size"),
                             ("train.batch_size", 1, "--batch-size"),
                             ("train.epochs", 1 << 30, "--epochs"),
                             ("train.precise_bn", -3, "--precise-bn"),
                             ("train.time_budget", -1, "--time-budget"),
                             ("train.label_smoothing", 2, "--label-smoothing")]:
        edited = os.path.join(tmp, "edited")
        shutil.rmtree(edited, ignore_errors=True)
        shutil.copytree(d, edited)
        st_save(os.path.join(edited, "last.safetensors"), sd, dict(meta, **{key: value}))
        _, err = run(["train", "--resume", edited], rc=1)
        one_error_line(err, os.path.join(edited, "last.safetensors"), "metadata", says)


def test_bad_predict_inputs():
    tmp = tmpdir()
    w = os.path.join(short_run()["dir"], "best.safetensors")
    good = os.path.join(tmp, "good.png")
    png_write(good, fashion("test", 1)[0][0])
    missing = os.path.join(tmp, "missing.png")
    out, err = run(["predict", "googlenet", "--weights", w, good, missing], rc=1)
    one_error_line(err, missing)
    assert out == "", "predict printed results before failing"
    corrupt = os.path.join(tmp, "corrupt.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    out, err = run(["predict", "googlenet", "--weights", w, good, corrupt], rc=1)
    one_error_line(err, corrupt)
    assert out == ""
    labels = os.path.join(tmp, "labels.txt")
    with open(labels, "w") as f:
        f.write("a\nb\n")
    _, err = run(["predict", "googlenet", "--weights", w, "--labels", labels, good], rc=1)
    one_error_line(err, labels, "10 classes")
    _, err = run(["predict", "vgg11", "--weights", w, good], rc=1)
    one_error_line(err, w, "googlenet")
    _, err = run(["predict", "googlenet", "--weights", os.path.join(tmp, "none.safetensors"), good], rc=1)
    one_error_line(err, "none.safetensors")
    # Metadata that the CLI would have refused, or a preprocessing and a model that disagree
    # (predict once fed such images to the model as they were: a read past its input).
    sd, meta = st_load(w, with_meta=True)
    size = int(meta["model.height"])
    for key, value, says in [("preprocess.height", size - 1, "makes 1x%dx%d images" % (size - 1, size)),
                             ("preprocess.channels", 3, "makes 3x"),
                             ("preprocess.width", -1, "image size"),
                             ("model.in_channels", 1 << 30, "image"),
                             ("model.num_classes", 1 << 21, "10 class names for a model with 2097152"),
                             ("model.dropout", 2, "dropout")]:
        edited = os.path.join(tmp, "edited.safetensors")
        st_save(edited, sd, dict(meta, **{key: value}))
        for verb in (["predict", "googlenet", "--weights", edited, good],
                     ["eval", "googlenet", "--weights", edited, "--data", "fashion-mnist", "--limit-test", 8]):
            out, err = run(verb, rc=1)
            one_error_line(err, says)
            assert out == "", out
    assert "--no-aux" in usage_error(["predict", "googlenet", "--weights", w, "--no-aux", good])
