"""Every reference op against PyTorch (torch 1.13): random cases, forward with
torch.nn.functional, backward with autograd, both in float64 from the same float32 inputs, so
the tolerance measures incept's float32 error alone. Runs build/tests/opcheck (tests/opcheck.c)
once per case.

Tolerances: relative error max|got-ref| / max|ref| <= 1e-5 forward, <= 1e-4 backward (float32
rounding of sums of up to a few hundred terms is ~1e-6; 1e-4 leaves room for the backward's
longer reductions without hiding any wrong index, divisor or window, which show up as O(1)).
Max pooling and concat/relu/dropout select or scale values and are compared exactly."""
import os, subprocess
import numpy as np
import torch
import torch.nn.functional as F
from common import BUILD, tmpdir, assert_close

OPCHECK = os.path.join(BUILD, "tests", "opcheck")
FWD, BWD = 1e-5, 1e-4
_gen = torch.Generator().manual_seed(1234)


def randn(*shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=_gen) * scale + shift


def opcheck(op, inputs, params, outputs):
    """Writes `inputs` (name -> tensor) as raw files, runs `opcheck DIR OP k=v...`, and returns
    {name: float64 tensor of the given shape} for `outputs` (name -> shape)."""
    d = tmpdir()
    for name, t in inputs.items():
        t = t.detach().contiguous()
        arr = t.numpy().astype(np.int64 if t.dtype == torch.int64 else np.float32)
        arr.tofile(os.path.join(d, name + ".bin"))
    args = [OPCHECK, d, op] + [f"{k}={v}" for k, v in params.items()]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(args[2:])}: exit {p.returncode}: {p.stderr.strip()}")
    got = {}
    for name, shape in outputs.items():
        arr = np.fromfile(os.path.join(d, name + ".bin"), dtype=np.float32)
        n = int(np.prod(shape))
        assert arr.size == n, f"{op} {params}: {name} has {arr.size} values, torch has {n} {tuple(shape)}"
        got[name] = torch.from_numpy(arr.astype(np.float64)).reshape(shape)
    return got


def leaf(t):
    """float64 copy of a float32 tensor that records gradients."""
    return t.double().requires_grad_()


def check(what, got, ref, tol):
    assert_close(got, ref.detach(), tol, what)


def test_conv2d():
    cases = [  # N C H W K k stride pad bias
        (1, 3, 7, 7, 4, 3, 1, 1, 1), (3, 2, 9, 8, 3, 3, 2, 1, 0), (2, 4, 14, 14, 5, 1, 1, 0, 1),
        (2, 3, 11, 13, 4, 5, 2, 2, 1), (1, 2, 5, 5, 3, 7, 1, 3, 1), (2, 3, 8, 8, 2, 2, 2, 0, 0),
        (1, 1, 1, 1, 1, 1, 1, 0, 1), (2, 3, 9, 9, 4, 3, 2, 0, 1), (1, 3, 16, 16, 4, 7, 2, 3, 1),
        (2, 4, 6, 7, 3, 1, 2, 0, 1), (1, 2, 4, 4, 3, 3, 3, 1, 1), (3, 5, 5, 5, 2, 3, 1, 0, 0),
        (2, 16, 8, 8, 8, 3, 1, 1, 1),
    ]
    for N, C, H, W, K, k, s, p, bias in cases:
        x, w, b = randn(N, C, H, W), randn(K, C, k, k, scale=0.3), randn(K)
        X, Wt, B = leaf(x), leaf(w), leaf(b)
        y = F.conv2d(X, Wt, B if bias else None, stride=s, padding=p)
        dy = randn(*y.shape)
        y.backward(dy.double())
        ins = {"x": x, "w": w, "dy": dy}
        outs = {"y": y.shape, "dx": x.shape, "dw": w.shape}
        if bias:
            ins["b"], outs["db"] = b, b.shape
        got = opcheck("conv2d", ins, dict(N=N, C=C, H=H, W=W, K=K, k=k, stride=s, pad=p,
                                          bias=bias), outs)
        tag = f"conv2d {(N, C, H, W, K, k, s, p, bias)}"
        check(tag + " y", got["y"], y, FWD)
        check(tag + " dx", got["dx"], X.grad, BWD)
        check(tag + " dw", got["dw"], Wt.grad, BWD)
        if bias:
            check(tag + " db", got["db"], B.grad, BWD)


def _bn_case(train, N, C, HW, eps, momentum):
    # Inputs far from zero mean and unit scale, to catch E[x^2]-E[x]^2 style cancellation.
    x = randn(N, C, HW, scale=2.0, shift=3.0)
    gamma, beta = randn(C, scale=0.5, shift=1.0), randn(C)
    rm, rv = randn(C), torch.rand(C, generator=_gen) + 0.5
    X, G, Bt = leaf(x), leaf(gamma), leaf(beta)
    rm_ref, rv_ref = rm.double().clone(), rv.double().clone()
    y = F.batch_norm(X.view(N, C, HW, 1), rm_ref, rv_ref, G, Bt, training=bool(train),
                     momentum=momentum, eps=eps).view(N, C, HW)
    dy = randn(N, C, HW)
    y.backward(dy.double())
    params = dict(N=N, C=C, HW=HW, eps=eps)
    outs = {"y": x.shape, "dx": x.shape, "dgamma": (C,), "dbeta": (C,)}
    if train:
        params["momentum"] = momentum
        outs.update(rm=(C,), rv=(C,), save_mean=(C,), save_invstd=(C,))
    got = opcheck("bn_train" if train else "bn_eval",
                  dict(x=x, gamma=gamma, beta=beta, rm=rm, rv=rv, dy=dy), params, outs)
    tag = f"bn_{'train' if train else 'eval'} {(N, C, HW, eps, momentum)}"
    check(tag + " y", got["y"], y, FWD)
    check(tag + " dx", got["dx"], X.grad, BWD)
    check(tag + " dgamma", got["dgamma"], G.grad, BWD)
    check(tag + " dbeta", got["dbeta"], Bt.grad, BWD)
    if train:
        xd = x.double()
        mean = xd.mean(dim=(0, 2))
        invstd = 1 / (xd.var(dim=(0, 2), unbiased=False) + eps).sqrt()
        check(tag + " running_mean", got["rm"], rm_ref, FWD)
        check(tag + " running_var", got["rv"], rv_ref, FWD)
        check(tag + " save_mean", got["save_mean"], mean, FWD)
        check(tag + " save_invstd", got["save_invstd"], invstd, FWD)


def test_batchnorm2d():
    # (With only 2 values per channel the training dx is exactly 0 in exact arithmetic, so a
    # relative error is meaningless there; 3 values is the smallest well-posed case.)
    for train in (1, 0):
        for N, C, HW, eps, mom in [(1, 3, 25, 1e-5, 0.1), (3, 4, 7, 1e-3, 0.3), (3, 5, 1, 1e-5, 0.1),
                                   (2, 2, 64, 1e-3, 0.01), (1, 1, 3, 1e-5, 1.0)]:
            _bn_case(train, N, C, HW, eps, mom)


def test_relu():
    x = randn(1000)
    x[::7] = 0.0  # exact zeros: no gradient (PyTorch's threshold_backward uses out <= 0)
    x[3] = float("nan")
    X = leaf(x)
    y = F.relu(X)
    dy = randn(1000)
    y.backward(dy.double())
    got = opcheck("relu", dict(x=x, dy=dy), dict(n=1000), dict(y=x.shape, dx=x.shape))
    ref = y.detach()
    assert torch.equal(got["y"].isnan(), ref.isnan()), "relu: NaN not propagated as PyTorch"
    ok = ~ref.isnan()
    assert torch.equal(got["y"][ok], ref[ok]), "relu y differs"
    assert torch.equal(got["dx"], X.grad), "relu dx differs"


def _pool_input(N, C, H, W, kind):
    if kind == "ties":  # few distinct values: many ties, the first maximum must win
        return torch.randint(0, 3, (N, C, H, W), generator=_gen).float()
    return randn(N, C, H, W)


def test_maxpool2d():
    cases = [  # N C H W k stride pad ceil
        (2, 3, 14, 14, 3, 2, 0, 1), (1, 2, 7, 7, 2, 2, 0, 1), (3, 2, 9, 9, 3, 2, 1, 1),
        (1, 1, 8, 8, 2, 2, 0, 1), (2, 2, 13, 11, 3, 2, 1, 0), (1, 2, 5, 6, 3, 1, 1, 0),
        (2, 1, 10, 10, 3, 3, 1, 1), (1, 2, 6, 6, 3, 1, 1, 1), (1, 1, 5, 5, 2, 2, 1, 1),
        (1, 3, 112, 112, 3, 2, 0, 1), (1, 1, 1, 1, 1, 1, 0, 0), (2, 2, 4, 9, 4, 3, 2, 1),
    ]
    for case in cases:
        N, C, H, W, k, s, p, ceil = case
        for kind in ("randn", "ties", "nan"):
            x = _pool_input(N, C, H, W, kind)
            if kind == "nan":
                x.view(-1)[:: max(1, x.numel() // 5)] = float("nan")
            X = leaf(x)
            y = F.max_pool2d(X, k, s, p, ceil_mode=bool(ceil))
            dy = randn(*y.shape)
            y.backward(dy.double())
            got = opcheck("maxpool", dict(x=x, dy=dy),
                          dict(N=N, C=C, H=H, W=W, k=k, stride=s, pad=p, ceil=ceil),
                          dict(y=y.shape, dx=x.shape))
            tag = f"maxpool {case} {kind}"
            ref = y.detach()
            assert torch.equal(got["y"].isnan(), ref.isnan()), tag + ": NaN positions differ"
            ok = ~ref.isnan()
            assert torch.equal(got["y"][ok], ref[ok]), tag + ": y differs"
            # Gradients route to the same argmax (sums of float32 dy in float64 vs float32).
            check(tag + " dx", got["dx"], X.grad, 1e-6)


def test_avgpool2d():
    cases = [  # N C H W k stride pad ceil
        (2, 3, 14, 14, 3, 2, 0, 1), (1, 2, 7, 7, 2, 2, 0, 1), (3, 2, 9, 9, 3, 2, 1, 1),
        (1, 1, 8, 8, 2, 2, 0, 1), (2, 2, 13, 11, 3, 2, 1, 0), (1, 2, 5, 6, 3, 1, 1, 0),
        (2, 1, 10, 10, 3, 3, 1, 1), (1, 2, 6, 6, 3, 1, 1, 1), (1, 1, 5, 5, 2, 2, 1, 1),
        (1, 2, 7, 7, 5, 3, 2, 1), (2, 2, 4, 9, 4, 3, 2, 1), (1, 2, 14, 14, 5, 3, 0, 0),
    ]
    for case in cases:
        N, C, H, W, k, s, p, ceil = case
        for cip in (0, 1):
            x = randn(N, C, H, W)
            X = leaf(x)
            y = F.avg_pool2d(X, k, s, p, ceil_mode=bool(ceil), count_include_pad=bool(cip))
            dy = randn(*y.shape)
            y.backward(dy.double())
            got = opcheck("avgpool", dict(x=x, dy=dy),
                          dict(N=N, C=C, H=H, W=W, k=k, stride=s, pad=p, ceil=ceil, cip=cip),
                          dict(y=y.shape, dx=x.shape))
            tag = f"avgpool {case} cip={cip}"
            check(tag + " y", got["y"], y, FWD)
            check(tag + " dx", got["dx"], X.grad, BWD)


def test_adaptive_avgpool2d():
    cases = [  # N C H W OH OW: downsampling (divisible or not), upsampling, global
        (2, 3, 14, 14, 4, 4), (1, 2, 5, 5, 4, 4), (3, 2, 1, 1, 7, 7), (1, 2, 3, 3, 7, 7),
        (2, 4, 7, 7, 1, 1), (1, 2, 8, 6, 2, 3), (1, 1, 6, 6, 6, 6), (2, 2, 5, 9, 7, 4),
    ]
    for case in cases:
        N, C, H, W, OH, OW = case
        x = randn(N, C, H, W)
        X = leaf(x)
        y = F.adaptive_avg_pool2d(X, (OH, OW))
        dy = randn(*y.shape)
        y.backward(dy.double())
        got = opcheck("adaptive", dict(x=x, dy=dy), dict(N=N, C=C, H=H, W=W, OH=OH, OW=OW),
                      dict(y=y.shape, dx=x.shape))
        check(f"adaptive {case} y", got["y"], y, FWD)
        check(f"adaptive {case} dx", got["dx"], X.grad, BWD)


def test_lrn():
    cases = [  # N C HW size alpha beta k: C < size, C > size, even size, strong nonlinearity
        (1, 3, 25, 5, 1e-4, 0.75, 2.0), (3, 12, 9, 5, 1e-4, 0.75, 2.0), (2, 8, 10, 4, 0.5, 0.75, 1.0),
        (1, 1, 7, 5, 1.0, 0.75, 1.0), (2, 10, 70, 3, 2.0, 0.5, 1.5), (1, 6, 4, 1, 0.3, 1.0, 1.0),
        (1, 7, 5, 6, 3.0, 0.75, 0.5),
    ]
    for case in cases:
        N, C, HW, size, alpha, beta, k = case
        x = randn(N, C, HW)
        X = leaf(x)
        y = F.local_response_norm(X.view(N, C, HW, 1), size, alpha, beta, k).view(N, C, HW)
        dy = randn(N, C, HW)
        y.backward(dy.double())
        got = opcheck("lrn", dict(x=x, dy=dy),
                      dict(N=N, C=C, HW=HW, size=size, alpha=alpha, beta=beta, k=k),
                      dict(y=x.shape, dx=x.shape))
        check(f"lrn {case} y", got["y"], y, FWD)
        check(f"lrn {case} dx", got["dx"], X.grad, BWD)


def test_linear():
    for case in [(1, 5, 3, 1), (3, 17, 10, 0), (2, 1024, 10, 1), (4, 1, 1, 1)]:
        N, IN, OUT, bias = case
        x, w, b = randn(N, IN), randn(OUT, IN, scale=0.1), randn(OUT)
        X, Wt, B = leaf(x), leaf(w), leaf(b)
        y = F.linear(X, Wt, B if bias else None)
        dy = randn(N, OUT)
        y.backward(dy.double())
        ins, outs = dict(x=x, w=w, dy=dy), dict(y=y.shape, dx=x.shape, dw=w.shape)
        if bias:
            ins["b"], outs["db"] = b, b.shape
        got = opcheck("linear", ins, dict(N=N, IN=IN, OUT=OUT, bias=bias), outs)
        check(f"linear {case} y", got["y"], y, FWD)
        check(f"linear {case} dx", got["dx"], X.grad, BWD)
        check(f"linear {case} dw", got["dw"], Wt.grad, BWD)
        if bias:
            check(f"linear {case} db", got["db"], B.grad, BWD)


def test_dropout():
    """The mask is drawn from incept's rng, so it cannot equal torch's; what must hold is
    torch's definition: mask in {0, 1/(1-p)} (float32), zeros with probability p, y = x*mask,
    dx = dy*mask; and the same seed gives the same mask."""
    n = 20000
    x, dy = randn(n), randn(n)
    for p in (0.0, 0.2, 0.5, 0.7, 1.0):
        runs = [opcheck("dropout", dict(x=x, dy=dy), dict(n=n, p=p, seed=seed),
                        dict(y=(n,), mask=(n,), dx=(n,))) for seed in (7, 7, 8)]
        got = runs[0]
        mask = got["mask"]
        scale = float(torch.tensor(1.0) / (1 - torch.tensor(p))) if p < 1 else 0.0
        assert torch.all((mask == 0) | (mask == scale)), f"dropout p={p}: mask values"
        zeros = (mask == 0).double().mean().item()
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(zeros - p) <= 5 * sigma + 1e-12, f"dropout p={p}: {zeros} dropped"
        assert torch.equal(got["y"], (x * mask.float()).double()), f"dropout p={p}: y"
        assert torch.equal(got["dx"], (dy * mask.float()).double()), f"dropout p={p}: dx"
        assert torch.equal(runs[1]["mask"], mask), f"dropout p={p}: same seed, other mask"
        if 0 < p < 1:
            assert not torch.equal(runs[2]["mask"], mask), f"dropout p={p}: seed ignored"


def test_concat():
    for N, HW, Cs in [(1, 5, (2, 1, 3)), (3, 4, (1, 4)), (2, 1, (3,)), (2, 9, (1, 1, 1, 2))]:
        xs = [randn(N, c, HW) for c in Cs]
        Xs = [leaf(x) for x in xs]
        y = torch.cat(Xs, dim=1)
        dy = randn(*y.shape)
        y.backward(dy.double())
        ins = {f"x{j}": x for j, x in enumerate(xs)}
        ins["dy"] = dy
        params = dict(N=N, HW=HW, n_in=len(Cs), **{f"C{j}": c for j, c in enumerate(Cs)})
        outs = {"y": y.shape, **{f"dx{j}": x.shape for j, x in enumerate(xs)}}
        got = opcheck("concat", ins, params, outs)
        assert torch.equal(got["y"], y.detach()), f"concat {Cs}: y"
        for j, X in enumerate(Xs):
            assert torch.equal(got[f"dx{j}"], X.grad), f"concat {Cs}: dx{j}"


def test_transform_input():
    import torchvision
    model = torchvision.models.googlenet(weights=None, aux_logits=False, transform_input=True,
                                         init_weights=False)
    for N, H, W in [(1, 4, 4), (3, 7, 5)]:
        x = randn(N, 3, H, W)
        X = x.clone().requires_grad_()  # float32, as torchvision runs it: same roundings
        y = model._transform_input(X)
        dy = randn(*y.shape)
        y.backward(dy)
        got = opcheck("transform_input", dict(x=x, dy=dy), dict(N=N, HW=H * W),
                      dict(y=x.shape, dx=x.shape))
        check(f"transform_input {(N, H, W)} y", got["y"], y, 1e-7)
        check(f"transform_input {(N, H, W)} dx", got["dx"], X.grad, 1e-7)


def test_softmax():
    for N, K, scale in [(1, 1, 1.0), (3, 10, 1.0), (2, 1000, 5.0), (4, 7, 100.0)]:
        x = randn(N, K, scale=scale)
        got = opcheck("softmax", dict(x=x), dict(N=N, K=K), dict(y=x.shape))
        check(f"softmax {(N, K, scale)}", got["y"], F.softmax(x.double(), dim=1), FWD)


def test_cross_entropy():
    for N, K, scale in [(1, 2, 1.0), (3, 10, 1.0), (8, 1000, 3.0), (5, 7, 50.0), (2, 1, 1.0)]:
        for s in (0.0, 0.1):
            x = randn(N, K, scale=scale)
            t = torch.randint(0, K, (N,), generator=_gen)
            X = leaf(x)
            loss = F.cross_entropy(X, t, label_smoothing=s)
            dloss = 0.7
            (loss * dloss).backward()
            got = opcheck("cross_entropy", dict(x=x, target=t),
                          dict(N=N, K=K, smoothing=s, dloss=dloss),
                          dict(loss=(1,), probs=x.shape, dx=x.shape))
            tag = f"cross_entropy {(N, K, scale)} s={s}"
            check(tag + " loss", got["loss"], loss.detach().reshape(1), FWD)
            check(tag + " probs", got["probs"], F.softmax(x.double(), dim=1), FWD)
            check(tag + " dx", got["dx"], X.grad, BWD)
