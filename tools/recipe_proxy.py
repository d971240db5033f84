# A PyTorch replica of `incept train googlenet --data fashion-mnist` (the defaults of
# cli/train.c), to try recipe changes on a GPU in minutes before spending an hour of CPU on one.
# Not used by the build or the tests. It mirrors: pad-2 random crop at 28 px + horizontal flip,
# bilinear resize to --size, mean/std 0.2860/0.3530, torchvision's googlenet (1 input channel,
# aux heads, dropout 0.2/0.7, its own initialisation), cross-entropy with label smoothing +
# 0.3 x each aux head's, SGD Nesterov 0.9 with weight decay not on BN weights and biases, one
# warmup epoch from 0.1x then cosine or poly decay per step, batch 128 with the last partial
# batch dropped; --precise-bn N as incept's. It logs per-epoch test top-1 to OUT/NAME.log.
# (An exponential moving average of the weights, tried in an earlier version, added nothing:
# docs/fashion-mnist.md.) More knobs for recipe search: --warmup, --warmup-factor and
# --dropout-aux as incept's options; --aux-weight and --mixup ALPHA, which incept would need
# to gain. tools/recipe_sweep.py runs several candidates x seeds side by side.
#
# The training step (forward, backward, SGD) runs as one CUDA graph per input size (--graph 0:
# eager); --sizes 32:16,64:8 trains 16 epochs at 32x32, then 8 at 64x64 (progressive resizing),
# on one cosine schedule over all of them.
#
# On one H200 (torch 2.11, float32 with TF32): four runs side by side take ~11 s per epoch each.
# 23 epochs at 64 px, seed 0: 94.41 % (eager, before the graphs: 94.25 %; incept --bf16 on the
# CPU: 94.31 %).
#   python3 tools/recipe_proxy.py --name base --size 64 --epochs 23 --out /tmp/proxy
# (On a machine without Debian's data set, copy its four .gz files along and pass --data DIR.)
import argparse, gzip, json, math, os, time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
p.add_argument("--epochs", type=int, default=23)
p.add_argument("--size", type=int, default=64)
p.add_argument("--sizes", default="", help="progressive resizing: SIZE:EPOCHS,... (overrides --size/--epochs)")
p.add_argument("--graph", type=int, default=1, help="capture the training step as a CUDA graph")
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--wd", type=float, default=5e-4)
p.add_argument("--ls", type=float, default=0.1)
p.add_argument("--batch", type=int, default=128)
p.add_argument("--schedule", default="cosine")
p.add_argument("--power", type=float, default=1.0)
p.add_argument("--dropout", type=float, default=0.2)
p.add_argument("--dropout-aux", type=float, default=0.7)
p.add_argument("--aux-weight", type=float, default=0.3, help="weight of each aux head's loss")
p.add_argument("--warmup", type=float, default=1.0, help="epochs of linear warmup")
p.add_argument("--warmup-factor", type=float, default=0.1, help="warmup starts at lr x this")
p.add_argument("--mixup", type=float, default=0.0, help="mixup's Beta(alpha, alpha); 0: off")
p.add_argument("--precise-bn", type=int, default=0,
               help="recompute BN statistics over N un-augmented training batches at the end")
p.add_argument("--altflip", type=int, default=0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--limit", type=int, default=0)
p.add_argument("--out", default=".")
a = p.parse_args()
plan = [(int(s.split(":")[0]), int(s.split(":")[1])) for s in a.sizes.split(",")] if a.sizes else [(a.size, a.epochs)]
a.epochs = sum(e for _, e in plan)
size_of_epoch = [s for s, e in plan for _ in range(e)]

dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(a.seed)
np.random.seed(a.seed)
torch.backends.cudnn.benchmark = True


def idx(path):
    with gzip.open(path, "rb") as f:
        b = f.read()
    nd = b[3]
    dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)


d = a.data
xtr = torch.from_numpy(idx(f"{d}/train-images-idx3-ubyte.gz").copy()).to(dev)
ytr = torch.from_numpy(idx(f"{d}/train-labels-idx1-ubyte.gz").astype(np.int64)).to(dev)
xte = torch.from_numpy(idx(f"{d}/t10k-images-idx3-ubyte.gz").copy()).to(dev)
yte = torch.from_numpy(idx(f"{d}/t10k-labels-idx1-ubyte.gz").astype(np.int64)).to(dev)
if a.limit:
    xtr, ytr, xte, yte = xtr[:a.limit], ytr[:a.limit], xte[:a.limit // 4], yte[:a.limit // 4]
N = xtr.shape[0]
MEAN, STD = 0.2860, 0.3530


def prep(x8, size):  # uint8 [B,28,28] -> normalised [B,1,S,S]
    x = x8.float().div_(255.0).unsqueeze(1)
    if size != 28:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD


pad_tr = F.pad(xtr, (2, 2, 2, 2))  # [N,32,32]
ar = torch.arange(28, device=dev)
g = torch.Generator(device=dev)
g.manual_seed(a.seed + 1)
flip0 = torch.rand(N, device=dev, generator=g) < 0.5


def train_batch(ids, epoch):
    B = ids.shape[0]
    top = torch.randint(0, 5, (B,), device=dev, generator=g)
    left = torch.randint(0, 5, (B,), device=dev, generator=g)
    rows = (top[:, None] + ar[None, :])[:, :, None]
    cols = (left[:, None] + ar[None, :])[:, None, :]
    x = pad_tr[ids[:, None, None], rows, cols]
    if a.altflip:
        fl = flip0[ids] ^ bool(epoch % 2)
    else:
        fl = torch.rand(B, device=dev, generator=g) < 0.5
    x = torch.where(fl[:, None, None], x.flip(-1), x)
    return prep(x, size_of_epoch[epoch])


m = torchvision.models.googlenet(weights=None, num_classes=10, aux_logits=True,
                                 transform_input=False, init_weights=True,
                                 dropout=a.dropout, dropout_aux=a.dropout_aux)
m.conv1.conv = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
nn.init.trunc_normal_(m.conv1.conv.weight, mean=0.0, std=0.01, a=-2, b=2)
m = m.to(dev)

# SGD with Nesterov momentum written out (PyTorch's update rule: d = g + wd p; buf = 0.9 buf + d;
# d += 0.9 buf; p -= lr d), with lr in a tensor so that the whole step can be one CUDA graph.
params = []
for n_, p_ in m.named_parameters():
    params.append((p_, torch.zeros_like(p_), 0.0 if p_.ndim <= 1 else a.wd))
lr_t = torch.zeros((), device=dev)


@torch.no_grad()
def sgd_step():
    for p_, buf, wd in params:
        d = p_.grad.add(p_, alpha=wd) if wd else p_.grad
        buf.mul_(0.9).add_(d)
        p_.sub_(d.add(buf, alpha=0.9) * lr_t)


spe = N // a.batch
W = int(round(a.warmup * spe))
T = max(a.epochs * spe - W, 1)


def lr_at(t):
    if t < W:
        return a.lr * (a.warmup_factor + (1 - a.warmup_factor) * t / W)
    u = min(t - W, T)
    if a.schedule == "cosine":
        return a.lr * (1 + math.cos(math.pi * u / T)) / 2
    return a.lr * (1 - u / T) ** a.power


def step_eager(x, y, y2, lam):
    """One step on x with targets y (mixup: lam * y + (1 - lam) * y2; lam a 0-d tensor)."""
    for p_, _, _ in params:
        p_.grad = None
    out, aux2, aux1 = m(x)

    def ce(o):
        l1 = F.cross_entropy(o, y, label_smoothing=a.ls)
        if not a.mixup:
            return l1
        return lam * l1 + (1 - lam) * F.cross_entropy(o, y2, label_smoothing=a.ls)

    loss = ce(out) + a.aux_weight * (ce(aux1) + ce(aux2))
    loss.backward()
    sgd_step()
    return out.detach(), loss.detach()


graphs = {}  # image size -> {"n": eager warmup steps done, "g": CUDAGraph, static tensors}
use_graph = bool(a.graph) and dev == "cuda"


def train_step(x, y, y2, lam):
    global use_graph
    if not use_graph:
        return step_eager(x, y, y2, lam)
    G = graphs.setdefault(x.shape[-1], {"n": 0})
    if "g" not in G:
        if G["n"] < 3:  # warm up on a side stream (cuDNN autotuning, lazy handles)
            s_ = torch.cuda.Stream()
            s_.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s_):
                r = step_eager(x, y, y2, lam)
            torch.cuda.current_stream().wait_stream(s_)
            G["n"] += 1
            return r
        try:
            G["x"], G["y"], G["y2"], G["lam"] = x.clone(), y.clone(), y2.clone(), lam.clone()
            for p_, _, _ in params:
                p_.grad = None
            g_ = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_):
                G["out"], G["loss"] = step_eager(G["x"], G["y"], G["y2"], G["lam"])
            G["g"] = g_
        except Exception as e:  # fall back to eager steps
            say(f"CUDA graph capture failed ({e}); eager steps from here")
            use_graph = False
            torch.cuda.synchronize()
            return step_eager(x, y, y2, lam)
    G["x"].copy_(x)
    G["y"].copy_(y)
    G["y2"].copy_(y2)
    G["lam"].copy_(lam)
    G["g"].replay()
    return G["out"], G["loss"]


@torch.no_grad()
def evaluate(model, size):
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, xte.shape[0], 1000):
        out = model(prep(xte[i:i + 1000], size))
        loss += F.cross_entropy(out, yte[i:i + 1000], reduction="sum").item()
        correct += (out.argmax(1) == yte[i:i + 1000]).sum().item()
    model.train()
    return 100.0 * correct / xte.shape[0], loss / xte.shape[0]


@torch.no_grad()
def precise_bn(size):
    """incept's --precise-bn: every BN's running statistics become plain averages over
    a.precise_bn un-augmented training batches spread over the set (batch k holds images
    (j * nb + k) * N / (nb * B) for j < B), as torch.optim.swa_utils.update_bn computes them."""
    nb = min(a.precise_bn, N // a.batch)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    saved = [mod.momentum for mod in bns]
    for mod in bns:
        mod.reset_running_stats()
        mod.momentum = None  # cumulative average
    j = torch.arange(a.batch, device=dev)
    for k in range(nb):
        ids = (j * nb + k) * N // (nb * a.batch)
        m(prep(xtr[ids], size))
    for mod, mom in zip(bns, saved):
        mod.momentum = mom


one = torch.ones((), device=dev)
os.makedirs(a.out, exist_ok=True)
log = open(os.path.join(a.out, a.name + ".log"), "w")


def say(s):
    print(f"[{a.name}] {s}", flush=True)
    log.write(s + "\n")
    log.flush()


say(json.dumps(vars(a)))
t = 0
t0 = time.time()
res = {}
for ep in range(a.epochs):
    perm = torch.randperm(N, device=dev, generator=g)
    m.train()
    tl = torch.zeros((), device=dev)
    tc = torch.zeros((), device=dev)
    for s in range(spe):
        ids = perm[s * a.batch:(s + 1) * a.batch]
        x, y = train_batch(ids, ep), ytr[ids]
        y2, lam = y, one
        if a.mixup:  # mixup within the batch: x mixed with a shuffled copy of itself
            lam = torch.distributions.Beta(a.mixup, a.mixup).sample().to(dev)
            j = torch.randperm(x.shape[0], device=dev, generator=g)
            x, y2 = lam * x + (1 - lam) * x[j], y[j]
        lr = lr_at(t)
        lr_t.fill_(lr)
        out, loss = train_step(x, y, y2, lam)
        t += 1
        tl += loss
        tc += (out.argmax(1) == y).sum()
    if a.precise_bn and ep + 1 == a.epochs:
        precise_bn(size_of_epoch[ep])
    acc, tloss = evaluate(m, size_of_epoch[ep])
    say(f"epoch {ep + 1} lr {lr:.5f} train_loss {tl.item() / spe:.4f} train_acc {100 * tc.item() / (spe * a.batch):.2f} "
        f"test_acc {acc:.2f} test_loss {tloss:.4f} t {time.time() - t0:.0f}s")
    res = {"acc": acc}
say("final " + json.dumps(res))
