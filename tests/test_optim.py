"""Optimisers and lr schedules against torch.optim (torch 1.13): build/tests/optimcheck runs
incept's optimiser on gradient sequences generated here and the same sequences go through
torch.optim.SGD/Adam/AdamW; schedules are compared with torch.optim.lr_scheduler."""
import os, subprocess, warnings
import numpy as np
import torch
from common import BUILD, tmpdir, assert_close

CHECK = os.path.join(BUILD, "tests", "optimcheck")

# Layout of the flat parameter buffer: (offset, size, no_decay). Floats 26..29 are not in any
# span (like BatchNorm running statistics): the optimiser must leave them alone.
SPANS = [(0, 20, 0), (20, 6, 1), (30, 5, 1), (35, 9, 0)]
N = 44
STEPS = 7


def _run(args, rc=0, threads=None, isa=None):
    env = dict(os.environ)
    if threads:
        env["INCEPT_THREADS"] = str(threads)
    if isa:
        env["INCEPT_ISA"] = isa
    p = subprocess.run([CHECK] + [str(a) for a in args], capture_output=True, text=True,
                       timeout=60, env=env)
    if p.returncode != rc:
        raise AssertionError(f"optimcheck {' '.join(map(str, args))}: exit {p.returncode}, "
                             f"wanted {rc}; stderr: {p.stderr.strip()}")
    return p


def _data(seed, N=N):
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(N, generator=g)
    # gradients of varied scale per step, some exact zeros (Adam's eps matters there)
    grads = torch.randn(STEPS, N, generator=g) * torch.logspace(-2, 0.5, STEPS)[:, None]
    grads[:, 3] = 0
    lrs = [0.1 * (1 - 0.08 * t) for t in range(STEPS)]
    return params, grads, lrs


def _torch_run(params, grads, lrs, kind, kw, decay_bn_bias, SPANS=SPANS):
    """The reference: one leaf tensor per span; no-decay spans in a weight_decay=0 group."""
    N = params.numel()
    ps = [params[o:o + n].clone().requires_grad_(True) for o, n, _ in SPANS]
    wd = kw.get("weight_decay", 0.01 if kind == "adamw" else 0.0)
    if decay_bn_bias or not wd:
        groups = [{"params": ps}]
    else:
        groups = [{"params": [p for p, s in zip(ps, SPANS) if not s[2]]},
                  {"params": [p for p, s in zip(ps, SPANS) if s[2]], "weight_decay": 0.0}]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    opt = cls(groups, lr=lrs[0], foreach=False, **kw)
    for t in range(STEPS):
        for p, (o, n, _) in zip(ps, SPANS):
            p.grad = grads[t, o:o + n].clone()
        for grp in opt.param_groups:
            grp["lr"] = lrs[t]
        opt.step()
    out = params.clone()
    state = {}
    for p, (o, n, _) in zip(ps, SPANS):
        out[o:o + n] = p.detach()
        for name, v in opt.state[p].items():
            if v is None:  # SGD without momentum keeps no buffer
                continue
            if name == "step":
                state["step"] = int(v.item())
            else:
                state.setdefault(name, torch.zeros(N))[o:o + n] = v
    return out, state


def _case(kind, kw, flags=(), decay_bn_bias=False, seed=0, resume_at=None, layout=(SPANS, N),
          threads=None, isa=None):
    SPANS, N = layout
    params, grads, lrs = _data(seed, N)
    ref, ref_state = _torch_run(params, grads, lrs, kind, kw, decay_bn_bias, SPANS)
    d = tmpdir()
    params.numpy().tofile(f"{d}/p.bin")
    grads.numpy().tofile(f"{d}/g.bin")
    opt_names = {"momentum": "--momentum", "dampening": "--dampening", "weight_decay": "--wd",
                 "eps": "--eps"}
    args = ["optim", "--kind", kind, "--n", N, "--steps", STEPS, "--params", f"{d}/p.bin",
            "--grads", f"{d}/g.bin", "--out", f"{d}/out.bin",
            "--lrs", ",".join(repr(x) for x in lrs),
            "--spans", ",".join(f"{o}:{n}:{nd}" for o, n, nd in SPANS)]
    for k, v in kw.items():
        if k == "betas":
            args += ["--beta1", repr(v[0]), "--beta2", repr(v[1])]
        elif k in opt_names:
            args += [opt_names[k], repr(v)]
        elif k in ("nesterov", "amsgrad"):
            if v:
                args.append("--" + k)
        else:
            raise ValueError(k)
    args += list(flags)
    if decay_bn_bias:
        args.append("--decay-bn-bias")
    if resume_at is not None:
        args += ["--resume-at", resume_at]
    _run(args, threads=threads, isa=isa)
    got = torch.from_numpy(np.fromfile(f"{d}/out.bin", dtype=np.float32))
    what = f"{kind} {kw}"
    assert_close(got, ref, 1e-5, f"{what}: params")
    # the displacement is the sensitive part: compare it on its own too
    assert_close(got - params, ref - params, 5e-5, f"{what}: params - initial")
    gaps = [(o + n, SPANS[i + 1][0]) for i, (o, n, _) in enumerate(SPANS[:-1]) if o + n < SPANS[i + 1][0]]
    assert gaps, "the layout must leave floats outside the spans"
    for a, b in gaps:
        assert torch.equal(got[a:b], params[a:b]), f"{what}: floats outside the spans changed"
    # the state a checkpoint stores must be PyTorch's state, name by name
    names = {"momentum_buffer": "optim.momentum_buffer", "exp_avg": "optim.exp_avg",
             "exp_avg_sq": "optim.exp_avg_sq", "max_exp_avg_sq": "optim.max_exp_avg_sq"}
    for tname, v in ref_state.items():
        if tname == "step":
            with open(f"{d}/out.bin.step") as f:
                assert int(f.read()) == v, f"{what}: step count"
            continue
        path = f"{d}/out.bin.{names[tname]}"
        assert os.path.exists(path), f"{what}: no state buffer {names[tname]}"
        buf = torch.from_numpy(np.fromfile(path, dtype=np.float32))
        assert_close(buf, v, 1e-5, f"{what}: state {tname}")
    for leftover in names.values():
        if os.path.exists(f"{d}/out.bin.{leftover}"):
            assert any(names.get(k) == leftover for k in ref_state), f"{what}: extra {leftover}"
    return got


def test_sgd_plain():
    _case("sgd", {})


def test_sgd_momentum():
    _case("sgd", {"momentum": 0.9})


def test_sgd_momentum_dampening():
    _case("sgd", {"momentum": 0.8, "dampening": 0.3}, seed=1)


def test_sgd_nesterov():
    _case("sgd", {"momentum": 0.9, "nesterov": True}, seed=2)


def test_sgd_weight_decay_no_decay_spans():
    _case("sgd", {"momentum": 0.9, "weight_decay": 0.05}, seed=3)


def test_sgd_weight_decay_everywhere():
    _case("sgd", {"momentum": 0.9, "weight_decay": 0.05}, decay_bn_bias=True, seed=4)


def test_adam():
    _case("adam", {}, seed=5)


def test_adam_weight_decay_betas_eps():
    _case("adam", {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-3}, seed=6)


def test_adam_amsgrad():
    _case("adam", {"amsgrad": True, "weight_decay": 0.01}, seed=7)


def test_adamw():
    _case("adamw", {"weight_decay": 0.1}, seed=8)


def test_adamw_amsgrad_decay_everywhere():
    _case("adamw", {"amsgrad": True}, decay_bn_bias=True, seed=9)


def test_resume_mid_run_is_exact():
    """Moving the state (step + buffers) into a fresh optimiser mid-run changes nothing."""
    for kind, kw in (("sgd", {"momentum": 0.9, "weight_decay": 0.05}),
                     ("adam", {"amsgrad": True}), ("adamw", {"weight_decay": 0.1})):
        a = _case(kind, kw, seed=10)
        b = _case(kind, kw, seed=10, resume_at=3)
        assert torch.equal(a, b), f"{kind}: resumed run differs from the uninterrupted one"


def test_threads_split_a_step_without_changing_a_bit():
    """A step over a few hundred thousand parameters runs on up to 3 threads, the parts cutting
    through spans: still torch.optim's result, and bit-identical for 1, 2 and 3 threads."""
    layout = ([(0, 100000, 0), (100000, 7, 1), (100011, 150000, 1), (250011, 33333, 0)], 283344)
    for kind, kw in (("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
                     ("adam", {"amsgrad": True, "weight_decay": 0.01}), ("adamw", {})):
        runs = [_case(kind, kw, seed=11, layout=layout, threads=t) for t in (1, 2, 3)]
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2]), kind


def test_vector_and_scalar_loops_agree_bit_for_bit():
    """The AVX-512 loops (16 floats at a time, a masked tail) do the scalar loops' operations in
    the same order: INCEPT_ISA=scalar gives the same bits, for every optimiser and option. 1037
    floats leave a 13-float tail; the spans also start and end off the 16-float grid. (On a CPU
    without AVX-512 both runs take the scalar loops.)"""
    layout = ([(0, 500, 0), (500, 7, 1), (511, 300, 1), (811, 226, 0)], 1037)
    for kind, kw in (("sgd", {}), ("sgd", {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05}),
                     ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
                     ("adam", {"amsgrad": True, "weight_decay": 0.01}),
                     ("adam", {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-3}),
                     ("adamw", {"amsgrad": True}), ("adamw", {"weight_decay": 0.1})):
        vec = _case(kind, kw, seed=12, layout=layout, threads=1)
        sca = _case(kind, kw, seed=12, layout=layout, threads=1, isa="scalar")
        assert torch.equal(vec, sca), f"{kind} {kw}: AVX-512 and scalar loops differ"


def test_bad_configs_are_rejected():
    d = tmpdir()
    np.zeros(4, np.float32).tofile(f"{d}/z.bin")
    base = ["optim", "--n", 4, "--steps", 1, "--params", f"{d}/z.bin", "--grads", f"{d}/z.bin",
            "--out", f"{d}/o.bin", "--lrs", "0.1"]
    for extra, words in ((["--kind", "sgd", "--nesterov"], "nesterov"),
                         (["--kind", "sgd", "--momentum", "-1"], "momentum"),
                         (["--kind", "adam", "--beta2", "1"], "beta2"),
                         (["--kind", "rmsprop"], "rmsprop"),
                         (["--kind", "sgd", "--spans", "2:3:0"], "outside"),
                         (["--kind", "sgd", "--spans", "0:2:0,1:2:1"], "overlap")):
        p = _run(base[:1] + extra + base[1:], rc=1)
        assert words in p.stderr, f"{extra}: message {p.stderr.strip()!r} lacks {words!r}"


# ---- schedules ----

def _torch_lrs(kind, base, epochs, spe, per_step, warmup=0, sf=1 / 3, step_size=30, gamma=0.1,
               eta_min=0.0, power=1.0):
    """lr of every unit (epoch, or step when per_step) from torch's own schedulers."""
    S = torch.optim.lr_scheduler
    scale = spe if per_step else 1
    W, T = warmup * scale, (epochs - warmup) * scale
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main = {"constant": lambda: S.ConstantLR(opt, factor=1.0, total_iters=0),
                "step": lambda: S.StepLR(opt, step_size=step_size * scale, gamma=gamma),
                "cosine": lambda: S.CosineAnnealingLR(opt, T_max=T, eta_min=eta_min),
                "poly": lambda: S.PolynomialLR(opt, total_iters=T, power=power)}
        if warmup:
            lin = S.LinearLR(opt, start_factor=sf, end_factor=1.0, total_iters=W)
            sched = S.SequentialLR(opt, [lin, main[kind]()], milestones=[W])
        else:
            sched = main[kind]()
        out = []
        for _ in range(epochs * scale):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


def _sched_case(kind, epochs=12, spe=3, per_step=False, **kw):
    ref = _torch_lrs(kind, 0.1, epochs, spe, per_step, **kw)
    names = {"warmup": "--warmup", "sf": "--start-factor", "step_size": "--step-size",
             "gamma": "--gamma", "eta_min": "--eta-min", "power": "--power"}
    args = ["sched", "--kind", kind, "--lr", "0.1", "--epochs", epochs, "--spe", spe,
            "--steps", epochs * spe]
    for k, v in kw.items():
        args += [names[k], repr(v)]
    if per_step:
        args.append("--per-step")
    got = [float(x) for x in _run(args).stdout.split()]
    assert len(got) == epochs * spe
    for step, lr in enumerate(got):
        want = ref[step] if per_step else ref[step // spe]
        assert abs(lr - want) <= 1e-9 * 0.1, \
            f"{kind} {kw} per_step={per_step}: step {step}: lr {lr!r}, torch {want!r}"


def test_schedule_constant():
    _sched_case("constant")
    _sched_case("constant", warmup=3, sf=0.1)


def test_schedule_step():
    _sched_case("step", step_size=3, gamma=0.5)
    _sched_case("step", step_size=4, gamma=0.1, warmup=2, sf=0.2)


def test_schedule_cosine():
    _sched_case("cosine", eta_min=0.001)
    _sched_case("cosine", warmup=2, sf=0.25)
    _sched_case("cosine", epochs=1)


def test_schedule_poly():
    _sched_case("poly", power=2.0)
    _sched_case("poly", power=0.5, warmup=1, sf=0.5)


def test_schedule_per_step():
    _sched_case("cosine", epochs=4, spe=5, per_step=True, warmup=1, sf=0.1, eta_min=0.002)
    _sched_case("step", epochs=10, spe=2, per_step=True, step_size=3, gamma=0.3)
    _sched_case("poly", epochs=10, spe=2, per_step=True, power=1.5, warmup=2)


def test_schedule_bad_configs():
    for extra, words in ((["--kind", "cosine", "--warmup", "12"], "warmup"),
                         (["--kind", "step", "--step-size", "0"], "step size"),
                         (["--kind", "linear"], "linear"),
                         (["--kind", "constant", "--warmup", "2", "--start-factor", "0"], "factor")):
        p = _run(["sched", "--epochs", 12, "--steps", 1] + extra, rc=1)
        assert words in p.stderr, f"{extra}: message {p.stderr.strip()!r} lacks {words!r}"
