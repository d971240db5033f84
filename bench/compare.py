#!/usr/bin/python3
"""`make bench`: incept against PyTorch, onnxruntime, OpenVINO and ncnn, side by side.

usage: bench/compare.py [--incept ./incept] [--build build] [--threads 2] [--only KEY ...]
                        [--omp-default]

1. Peers. PyTorch is Debian's torch 1.13 (/usr/bin/python3, the project's reference oracle).
   onnxruntime, openvino, ncnn, pnnx (which brings PyPI's current torch, also timed, as
   "pytorch-pypi") and torchvision are pip-installed by name into BUILD/bench-venv, a virtualenv
   made with a non-Debian python3 (pyenv's; BENCH_PYTHON overrides). A peer that cannot be
   installed or set up gets "n/a: why" in its column.
2. Same weights everywhere: `incept init MODEL --seed 1` (what `incept bench` itself runs),
   loaded into torchvision, exported to ONNX (onnxruntime, OpenVINO) and through a TorchScript
   trace and pnnx to ncnn. Every engine's outputs on one input are checked against PyTorch's
   (and incept forward's, from the same file) before anything is timed.
3. Each workload starts its peers in fresh processes (so peak RSS is per workload), then times
   all engines round-robin, rotating the order every repetition, >= 5 repetitions of K runs
   each after warm-up; a repetition's value is the median of its K runs and each engine's
   figure the median over repetitions. incept runs as `incept bench ... --iters K` (2 warm-up
   runs of its own every time), from a copy of the binary taken at the start.
   The OpenMP peers (PyTorch, ncnn) run with OMP_WAIT_POLICY=PASSIVE unless --omp-default:
   with spinning OpenMP barriers, Debian's torch gets 4-5x slower as soon as anything else
   wants a core of this 2-core machine (incept's pool waits only briefly before sleeping).
4. Prints one row per workload (each median and incept's ratio to each peer), the peak-RSS rows,
   the issue's targets one by one and `targets met: K/N` last. The table also goes to
   BUILD/bench-work/results.md and everything measured to BUILD/bench-work/results.json;
   pip, export and peer logs are in BUILD/bench-work/logs/.
"""
import argparse
import hashlib
import json
import os
import re
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEBIAN_PY = "/usr/bin/python3"
PIP_PKGS = ["onnxruntime", "openvino", "ncnn", "pnnx", "torchvision"]
ENGINES = ["incept", "pytorch", "pytorch-pypi", "onnxruntime", "openvino", "ncnn"]
INFER_PEERS = ["pytorch", "pytorch-pypi", "onnxruntime", "openvino", "ncnn"]
TRAIN_PEERS = ["pytorch", "pytorch-pypi"]
CHECK_TOL = 1e-3   # outputs further than this from PyTorch's get a "!" in the table
GAP_S = 0.25    # pause between turns: lets a finished engine's spinning threads go idle

# check_scale: the outputs are compared on the input times this. GoogLeNet in eval mode with
# freshly initialised BN (running mean 0, var 1) shrinks its features ~10x per Inception block,
# so at unit input its logits are the fc bias to float precision and would agree whatever the
# convolutions did. Every layer before fc is positively homogeneous (convs without bias,
# identity BN, ReLU, max/avg pools), so scaling the input by 1e10 scales the features by 1e10
# and makes the logits depend on every layer.
# unit "ms": latency per batch (ratio incept/peer < 1 means incept is faster);
# unit "img/s": throughput (ratio > 1 means incept is faster).
WORKLOADS = [
    dict(key="gn-b1", title="googlenet inference 3x224x224 batch 1", unit="ms", model="googlenet",
         batch=1, input="3x224x224", train=False, aux=False, classes=1000, reps=9, iters=10,
         peers=INFER_PEERS, check_scale=1e10),
    dict(key="gn-b16", title="googlenet inference 3x224x224 batch 16", unit="img/s",
         model="googlenet", batch=16, input="3x224x224", train=False, aux=False, classes=1000,
         reps=7, iters=2, peers=INFER_PEERS, check_scale=1e10),
    dict(key="gn-train", title="googlenet train step 3x224x224 b16 aux SGD-m", unit="img/s",
         model="googlenet", batch=16, input="3x224x224", train=True, aux=True, classes=1000,
         reps=5, iters=2, peers=TRAIN_PEERS),
    dict(key="gn-train32", title="googlenet train step 3x32x32 b128 no aux", unit="img/s",
         model="googlenet", batch=128, input="3x32x32", train=True, aux=False, classes=10,
         reps=7, iters=2, peers=TRAIN_PEERS),
    dict(key="vgg16-b1", title="vgg16 inference 3x224x224 batch 1", unit="ms", model="vgg16",
         batch=1, input="3x224x224", train=False, aux=False, classes=1000, reps=7, iters=3,
         peers=INFER_PEERS, check_scale=1.0),
]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def last_error_line(text, default="failed"):
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    errs = [l for l in lines if l.startswith("ERROR") or "Error" in l]
    return " ".join(((errs or lines or [default])[-1]).split())[:200]


# ---------------------------------------------------------------- safetensors (numpy only)

def st_write(path, name, arr):
    b = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
    h = json.dumps({name: {"dtype": "F32", "shape": list(arr.shape),
                           "data_offsets": [0, len(b)]}}).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b)


def st_read(path, name):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    info = json.loads(data[8:8 + n])[name]
    b, e = info["data_offsets"]
    return np.frombuffer(data[8 + n + b:8 + n + e], dtype=np.float32).reshape(info["shape"])


# ---------------------------------------------------------------- peers: install and export

def pyenv_python():
    """A python3 that is not Debian's: BENCH_PYTHON, else the first python3 on PATH outside
    /usr/bin and /bin (pyenv's shim), else ~/.pyenv's."""
    if os.environ.get("BENCH_PYTHON"):
        return os.environ["BENCH_PYTHON"]
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, "python3")
        if os.access(p, os.X_OK) and os.path.realpath(d) not in ("/usr/bin", "/bin"):
            return p
    p = os.path.expanduser("~/.pyenv/shims/python3")
    return p if os.access(p, os.X_OK) else None


def venv_setup(venv, logdir):
    """Makes VENV and pip-installs each peer package; returns ({pkg: None or why}, python)."""
    py = os.path.join(venv, "bin", "python")
    status = {}
    if not os.access(py, os.X_OK):
        base = pyenv_python()
        if not base:
            return {p: "no non-Debian python3 found (set BENCH_PYTHON)" for p in PIP_PKGS}, py
        log(f"bench: creating {venv} with {base} -m venv")
        r = subprocess.run([base, "-m", "venv", venv], capture_output=True, text=True)
        if r.returncode:
            why = (f"{base} -m venv failed (exit {r.returncode}): "
                   f"{last_error_line(r.stderr + r.stdout, 'no message')}")
            return {p: why for p in PIP_PKGS}, py
    for pkg in PIP_PKGS:
        stamp = os.path.join(venv, f".installed-{pkg}")
        if os.path.exists(stamp):
            status[pkg] = None
            continue
        log(f"bench: pip install {pkg} (into {venv}; logs/pip-{pkg}.log)")
        with open(os.path.join(logdir, f"pip-{pkg}.log"), "w") as out:
            r = subprocess.run([py, "-m", "pip", "install", "--disable-pip-version-check", pkg],
                               stdout=out, stderr=subprocess.STDOUT, timeout=1800)
        if r.returncode:
            with open(os.path.join(logdir, f"pip-{pkg}.log")) as f:
                status[pkg] = f"pip install {pkg}: {last_error_line(f.read())}"
        else:
            open(stamp, "w").close()
            status[pkg] = None
    return status, py


def run_logged(cmd, logpath, cwd=None, timeout=1800):
    """Runs CMD with its output in LOGPATH; returns None or the reason it failed."""
    with open(logpath, "w") as out:
        try:
            r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                               timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return str(e)[:200]
    if r.returncode:
        with open(logpath, errors="replace") as f:
            return f"exit {r.returncode}: {last_error_line(f.read())}"
    return None


def model_flags(w):
    flags = []
    if w["model"] == "googlenet" and not w["aux"]:
        flags.append("--no-aux")
    if w["classes"] != 1000:
        flags += ["--num-classes", str(w["classes"])]
    return flags


class Artifacts:
    """Weights and exported model files under WORK, reused while the weights are unchanged."""

    def __init__(self, a, venv_py, pkg_status):
        self.a, self.venv_py, self.pkg = a, venv_py, pkg_status
        self.weights = {}       # (model, flags) -> (path, why-not)
        self.exports = {}       # (weights path, kind, batch) -> (path, why-not)

    def weights_for(self, w):
        key = (w["model"], tuple(model_flags(w)))
        if key not in self.weights:
            tag = "-".join([w["model"]] + [f.strip("-") for f in model_flags(w)])
            path = os.path.join(self.a.work, f"{tag}.safetensors")
            tmp = path + ".new"
            why = run_logged([self.a.incept, "init", w["model"], "--seed", "1", "--output", tmp]
                             + model_flags(w), os.path.join(self.a.logdir, f"init-{tag}.log"))
            if why:
                self.weights[key] = (None, f"incept init: {why}")
            else:
                if not (os.path.exists(path) and file_sha(path) == file_sha(tmp)):
                    os.replace(tmp, path)       # new weights: exports below are redone
                    for old in os.listdir(self.a.work):
                        if old.startswith(tag + "-exp"):
                            os.remove(os.path.join(self.a.work, old))
                else:
                    os.remove(tmp)
                self.weights[key] = (path, None)
        return self.weights[key]

    def onnx_for(self, w):
        wpath, why = self.weights_for(w)
        if why:
            return None, why
        out = wpath[:-len(".safetensors")] + "-exp"
        path = f"{out}_b{w['batch']}.onnx"
        if not os.path.exists(path):
            log(f"bench: exporting {os.path.basename(path)} (Debian's torch)")
            why = run_logged([DEBIAN_PY, os.path.join(HERE, "export.py"), w["model"],
                              "--weights", wpath, "--input", w["input"], "--num-classes",
                              str(w["classes"]), "--out", out, "--onnx-batches", str(w["batch"])],
                             os.path.join(self.a.logdir, f"export-{os.path.basename(path)}.log"))
            if why:
                return None, f"ONNX export: {why}"
        return path, None

    def ncnn_for(self, w):
        wpath, why = self.weights_for(w)
        if why:
            return None, why
        for pkg in ("ncnn", "pnnx"):
            if self.pkg.get(pkg):
                return None, self.pkg[pkg]
        out = wpath[:-len(".safetensors")] + "-exp"
        param = f"{out}.ncnn.param"
        if os.path.exists(param) and os.path.exists(f"{out}.ncnn.bin"):
            return param, None
        name = os.path.basename(out)
        log(f"bench: TorchScript trace (Debian's torch) and pnnx -> {name}.ncnn.param/.bin")
        why = run_logged([DEBIAN_PY, os.path.join(HERE, "export.py"), w["model"], "--weights",
                          wpath, "--input", w["input"], "--num-classes", str(w["classes"]),
                          "--out", out, "--torchscript"],
                         os.path.join(self.a.logdir, f"export-{name}.pt.log"))
        if why:
            return None, f"TorchScript trace: {why}"
        pnnx = os.path.join(os.path.dirname(self.venv_py), "pnnx")
        c, h, wd = w["input"].split("x")
        with tempfile.TemporaryDirectory(dir=self.a.work) as tmp:
            shutil.copy(f"{out}.pt", os.path.join(tmp, "m.pt"))
            # fp16=0: keep the weights float32 in the .bin (pnnx stores fp16 by default)
            why = run_logged([pnnx, "m.pt", f"inputshape=[1,{c},{h},{wd}]", "fp16=0"],
                             os.path.join(self.a.logdir, f"pnnx-{name}.log"), cwd=tmp)
            if why or not os.path.exists(os.path.join(tmp, "m.ncnn.param")):
                return None, f"pnnx: {why or 'wrote no m.ncnn.param'}"
            os.replace(os.path.join(tmp, "m.ncnn.bin"), f"{out}.ncnn.bin")
            os.replace(os.path.join(tmp, "m.ncnn.param"), param)
        return param, None


def file_sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- running engines

class Peer:
    """A bench/peer.py process; every request has a deadline."""

    def __init__(self, name, cmd, logpath, omp_passive, timeout=900):
        self.name, self.timeout = name, timeout
        self.logf = open(logpath, "w")
        env = dict(os.environ, OMP_NUM_THREADS=cmd[cmd.index("--threads") + 1])
        if omp_passive:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.logf, text=True, env=env)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.p.stdout, selectors.EVENT_READ)

    def read(self):
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.sel.select(timeout=min(5.0, deadline - time.time())):
                line = self.p.stdout.readline()
                if not line:
                    raise RuntimeError(f"exited ({self.p.wait()}); see {self.logf.name}")
                return json.loads(line)
        raise RuntimeError(f"no answer in {self.timeout} s")

    def ask(self, req):
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self):
        try:
            if self.p.poll() is None:
                self.p.stdin.write('{"cmd": "quit"}\n')
                self.p.stdin.flush()
                self.p.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.p.kill()
            self.p.wait()
        self.logf.close()


INCEPT_RE = {
    "ms": re.compile(r"median ([\d.]+) ms per batch"),
    "pct": re.compile(r"= (\d+) % of the measured FMA peak \(([\d.]+) GFLOP/s\)"),
    "rss": re.compile(r"peak RSS ([\d.]+) MiB"),
    "kern": re.compile(r"(\w+) kernels"),
}


def incept_turn(a, w, iters):
    """One `incept bench` run; returns (seconds per batch, peak RSS MiB, % of peak, kernels,
    CPU s per wall s)."""
    # Model options go first: cli/bench.c returns 1 silently when one ends the command line.
    cmd = [a.incept, "bench", w["model"]] + model_flags(w) + [
        "--batch", str(w["batch"]), "--input", w["input"], "--threads", str(a.threads),
        "--iters", str(iters)]
    if w["train"]:
        cmd.append("--train")
    c0, t0 = os.times(), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    c1, wall = os.times(), time.perf_counter() - t0
    if r.returncode:
        why = last_error_line(r.stderr or r.stdout, "no output")
        raise RuntimeError(f"incept bench exit {r.returncode}: {why}")
    m = {k: rx.search(r.stdout) for k, rx in INCEPT_RE.items()}
    if not all(m.values()):
        raise RuntimeError(f"cannot parse incept bench output: {r.stdout.strip()[:200]}")
    cpu = (c1.children_user - c0.children_user + c1.children_system - c0.children_system) / wall
    return (float(m["ms"].group(1)) / 1e3, float(m["rss"].group(1)), float(m["pct"].group(1)),
            m["kern"].group(1), cpu)


def peer_command(a, name, w, art, venv_py):
    """The command line for peer NAME on workload W, or (None, why not)."""
    if name == "pytorch":
        py = DEBIAN_PY
    else:
        need = {"pytorch-pypi": ["pnnx", "torchvision"], "onnxruntime": ["onnxruntime"],
                "openvino": ["openvino"], "ncnn": ["ncnn", "pnnx"]}[name]
        for pkg in need:
            if art.pkg.get(pkg):
                return None, art.pkg[pkg]
        py = venv_py
    engine = {"pytorch": "torch", "pytorch-pypi": "torch"}.get(name, name)
    cmd = [py, os.path.join(HERE, "peer.py"), engine, w["model"], "--batch", str(w["batch"]),
           "--input", w["input"], "--threads", str(a.threads), "--num-classes", str(w["classes"])]
    if w["train"]:
        cmd.append("--train")
        if w["aux"]:
            cmd.append("--aux")
    else:
        cmd += ["--check-scale", repr(w["check_scale"])]
    if engine == "torch":
        path, why = art.weights_for(w)
        cmd += ["--weights", path or ""]
    elif name in ("onnxruntime", "openvino"):
        path, why = art.onnx_for(w)
        cmd += ["--file", path or ""]
    else:
        path, why = art.ncnn_for(w)
        cmd += ["--file", path or ""]
    return (None, why) if why else (cmd, None)


def rel_diff(got, ref):
    got, ref = np.asarray(got, np.float64).reshape(-1), np.asarray(ref, np.float64).reshape(-1)
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def incept_check(a, w, art):
    """incept forward on the peers' check input with the same weights file: its first outputs."""
    wpath, why = art.weights_for(w)
    if why:
        return None
    c, h, wd = (int(v) for v in w["input"].split("x"))
    x = np.random.RandomState(1).standard_normal((w["batch"], c, h, wd)).astype(np.float32)
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        st_write(os.path.join(tmp, "x.safetensors"), "input", x[:1] * w["check_scale"])
        why = run_logged([a.incept, "forward", w["model"], "--weights", wpath, "--input",
                          os.path.join(tmp, "x.safetensors"), "--output",
                          os.path.join(tmp, "y.safetensors")] + model_flags(w),
                         os.path.join(a.logdir, f"forward-{w['key']}.log"))
        return None if why else st_read(os.path.join(tmp, "y.safetensors"), "logits")[0]


def workload_run(a, w, art, venv_py, res):
    """Times every engine of W round-robin; fills res[engine] = dict(...) or 'n/a: why'."""
    names = ["incept"] + w["peers"]
    peers = {}
    log(f"bench: {w['title']}: starting peers")
    for name in w["peers"]:
        cmd, why = peer_command(a, name, w, art, venv_py)
        if why:
            res[name] = f"n/a: {why}"
            continue
        p = Peer(name, cmd, os.path.join(a.logdir, f"peer-{w['key']}-{name}.log"),
                 not a.omp_default)
        try:
            hello = p.read()
        except (RuntimeError, ValueError) as e:
            hello = {"error": str(e)}
        if "error" in hello:
            res[name] = f"n/a: setup failed: {hello['error']}"
            p.close()
            continue
        peers[name] = p
        res[name] = {"version": hello["version"], "check": hello["check"], "turns": [], "cpu": []}
    # Outputs must agree before timings mean anything (inference only: training uses dropout).
    if not w["train"] and isinstance(res.get("pytorch"), dict):
        ref = res["pytorch"]["check"]
        got = incept_check(a, w, art)
        res["incept-check"] = None if got is None else rel_diff(got, ref)
        for name in w["peers"][1:]:
            if isinstance(res.get(name), dict):
                res[name]["check_diff"] = rel_diff(res[name]["check"], ref)
    for r in res.values():
        if isinstance(r, dict):
            r.pop("check", None)
    res["incept"] = {"turns": [], "cpu": [], "rss": 0.0}
    log(f"bench: {w['title']}: {w['reps']} rounds of {w['iters']} run(s) each, "
        f"engines {', '.join(n for n in names if n == 'incept' or n in peers)}")
    for rep in range(w["reps"]):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            r = res.get(name)
            if not isinstance(r, dict):
                continue
            time.sleep(GAP_S)
            try:
                if name == "incept":
                    sec, rss, pct, kern, cpu = incept_turn(a, w, w["iters"])
                    r["rss"] = max(r["rss"], rss)
                    r["pct"], r["kernels"] = pct, kern
                    r["turns"].append(sec)
                    r["cpu"].append(cpu)
                else:
                    ans = peers[name].ask({"cmd": "run", "iters": w["iters"]})
                    r["turns"].append(float(np.median(ans["times"])))
                    r["cpu"].append(ans["cpu"])
            except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as e:
                res[name] = f"n/a: failed while timing: {' '.join(str(e).split())[:200]}"
                if name in peers:
                    peers.pop(name).close()
    for name, p in peers.items():
        try:
            res[name]["rss"] = p.ask({"cmd": "rss"})["rss_mib"]
        except (RuntimeError, ValueError, OSError):
            pass
        p.close()
    for r in res.values():
        if isinstance(r, dict) and r.get("turns"):
            r["sec"] = float(np.median(r["turns"]))
            r["value"] = r["sec"] * 1e3 if w["unit"] == "ms" else w["batch"] / r["sec"]


# ---------------------------------------------------------------- report

def fmt(v, unit):
    return f"{v:.0f}" if unit == "MiB" else f"{v:.1f}"


def table_rows(results):
    """[(title, unit, {engine: cell text}, incept extra)] for the workloads and RSS rows."""
    rows = []
    for w in WORKLOADS:
        res = results.get(w["key"])
        if res is None:
            continue
        rows.append((w["title"], w["unit"], cells(res, w, "value", w["unit"]), res))
    for key, title in (("gn-b1", "peak RSS, googlenet inference batch 1"),
                       ("gn-train", "peak RSS, googlenet training batch 16")):
        res = results.get(key)
        if res is not None:
            w = next(x for x in WORKLOADS if x["key"] == key)
            rows.append((title, "MiB", cells(res, w, "rss", "MiB"), None))
    return rows


def cells(res, w, field, unit):
    out = {}
    inc = res.get("incept")
    iv = inc.get(field) if isinstance(inc, dict) else None
    for name in ENGINES:
        r = res.get(name)
        if name != "incept" and name not in w["peers"]:
            out[name] = "-"
        elif isinstance(r, str):
            out[name] = r
        elif not isinstance(r, dict) or r.get(field) is None:
            out[name] = "n/a: no result"
        elif name == "incept" or not iv:
            out[name] = fmt(r[field], unit)
        else:
            out[name] = f"{fmt(r[field], unit)} ({iv / r[field]:.2f}x)"
        diff = res.get("incept-check") if name == "incept" else (
            r.get("check_diff") if isinstance(r, dict) else None)
        if diff is not None and not diff <= CHECK_TOL:
            out[name] += " !"
    return out


def table_text(rows, markdown):
    head = ["workload", "unit"] + ENGINES + ["incept % peak"]
    lines = []
    body = []
    for title, unit, c, res in rows:
        pct = ""
        if res and isinstance(res.get("incept"), dict) and "pct" in res["incept"]:
            pct = f"{res['incept']['pct']:.0f} %"
        body.append([title, unit] + [c[e] for e in ENGINES] + [pct])
    if markdown:
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    # plain text: long "n/a: why" cells are footnoted so the columns stay readable
    notes = []
    for r in body:
        for i, v in enumerate(r):
            if v.startswith("n/a") and len(v) > 14:
                if v not in notes:
                    notes.append(v)
                r[i] = f"n/a [{notes.index(v) + 1}]"
    width = [max(len(x) for x in col) for col in zip(head, *body)]
    for r in [head] + body:
        lines.append("  ".join(v.ljust(n) for v, n in zip(r, width)).rstrip())
    lines += [f"  [{i + 1}] {n}" for i, n in enumerate(notes)]
    return "\n".join(lines)


def targets(results):
    """The issue's target table, clause by clause: [(text, True/False/None, detail)]."""
    def val(key, name, field="value"):
        r = results.get(key, {}).get(name)
        return r.get(field) if isinstance(r, dict) else None

    out = []

    def ratio_target(text, key, peer, bound, lower_is_better, field="value"):
        i, p = val(key, "incept", field), val(key, peer, field)
        if i is None or p is None:
            out.append((text, None, f"{peer if i else 'incept'} has no result"))
            return
        ratio = i / p
        ok = ratio <= bound if lower_is_better else ratio >= bound
        out.append((text, ok, f"{ratio:.2f}x"))

    def fastest_target(text, key, peers, lower_is_better):
        i = val(key, "incept")
        vals = {p: val(key, p) for p in peers if val(key, p) is not None}
        if i is None or not vals:
            out.append((text, None, "no result to compare"))
            return
        best = (min if lower_is_better else max)(vals, key=vals.get)
        ok = i <= vals[best] if lower_is_better else i >= vals[best]
        missing = [p for p in peers if p not in vals]
        out.append((text, ok, f"incept {i:.1f} vs {best} {vals[best]:.1f}"
                    + (f" ({', '.join(missing)} n/a)" if missing else "")))

    ratio_target("googlenet b1 latency <= 0.5 x PyTorch", "gn-b1", "pytorch", 0.5, True)
    fastest_target("googlenet b1 latency no slower than onnxruntime, OpenVINO, ncnn", "gn-b1",
                   ["onnxruntime", "openvino", "ncnn"], True)
    ratio_target("googlenet b16 throughput >= 2 x PyTorch", "gn-b16", "pytorch", 2.0, False)
    pct = val("gn-b16", "incept", "pct")
    out.append(("googlenet b16 at >= 50 % of the FMA peak", None if pct is None else pct >= 50,
                 "no result" if pct is None else f"{pct:.0f} %"))
    fastest_target("googlenet b16 throughput no slower than the fastest engine", "gn-b16",
                   INFER_PEERS, False)
    ratio_target("googlenet training 224 b16 aux >= 1.5 x PyTorch", "gn-train", "pytorch", 1.5,
                 False)
    ratio_target("googlenet training 32x32 b128 >= 1.5 x PyTorch", "gn-train32", "pytorch", 1.5,
                 False)
    ratio_target("vgg16 b1 latency <= 0.7 x PyTorch", "vgg16-b1", "pytorch", 0.7, True)
    rss = val("gn-b1", "incept", "rss")
    out.append(("peak RSS, inference b1 <= 64 MiB", None if rss is None else rss <= 64,
                "no result" if rss is None else f"{rss:.0f} MiB"))
    ratio_target("peak RSS, training b16 <= 0.6 x PyTorch", "gn-train", "pytorch", 0.6, True,
                 "rss")
    return out


def report(a, results, meta):
    rows = table_rows(results)
    tg = targets(results)
    print()
    print(f"incept vs peers, {a.threads} thread(s) each, OpenMP wait policy "
          f"{meta['omp_wait_policy']}, medians; ratio = incept / peer "
          "(ms, MiB: below 1 is better for incept; img/s: above 1 is)")
    print(table_text(rows, markdown=False))
    print()
    for w in WORKLOADS:
        res = results.get(w["key"])
        if not res:
            continue
        cpu = [f"{n} {np.mean(r['cpu']):.2f}" for n in ENGINES
               if isinstance(r := res.get(n), dict) and r.get("cpu")]
        chk = [f"{n} {r['check_diff']:.1e}" for n in ENGINES
               if isinstance(r := res.get(n), dict) and r.get("check_diff") is not None]
        if res.get("incept-check") is not None:
            chk.insert(0, f"incept {res['incept-check']:.1e}")
        load = "-".join(f"{v:.1f}" for v in res.get("loadavg", []))
        print(f"{w['key']}: load average {load}; CPU s per wall s: {', '.join(cpu)}"
              + (f"; outputs vs PyTorch (max rel diff): {', '.join(chk)}" if chk else ""))
    if any(" !" in c for row in rows for c in row[2].values()):
        print(f"! = outputs differ from PyTorch's by more than {CHECK_TOL:g} (relative)")
    print("versions: " + ", ".join(meta["versions"]))
    print()
    met = 0
    for text, ok, detail in tg:
        met += ok is True
        print(f"  [{'met' if ok else 'not met' if ok is False else 'unknown'}] {text}: {detail}")
    md = table_text(rows, markdown=True)
    with open(os.path.join(a.work, "results.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(a.work, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results,
                   "targets": [dict(target=t, met=o, detail=d) for t, o, d in tg]}, f, indent=1)
    print(f"targets met: {met}/{len(tg)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--incept", default=os.path.join(ROOT, "incept"))
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--omp-default", action="store_true",
                    help="leave OpenMP's wait policy at its default (spinning) for the peers")
    ap.add_argument("--only", nargs="*", default=[], help="only these workloads: " + " ".join(w["key"] for w in WORKLOADS))
    a = ap.parse_args()
    a.work = os.path.join(os.path.abspath(a.build), "bench-work")
    a.logdir = os.path.join(a.work, "logs")
    os.makedirs(a.logdir, exist_ok=True)
    # One binary for the whole run, safe from a rebuild of ./incept while the bench runs.
    snapshot = os.path.join(a.work, "incept")
    shutil.copy2(os.path.abspath(a.incept), snapshot + ".new")
    os.replace(snapshot + ".new", snapshot)
    a.incept = snapshot
    t0 = time.time()
    pkg, venv_py = venv_setup(os.path.join(os.path.abspath(a.build), "bench-venv"), a.logdir)
    for p, why in pkg.items():
        if why:
            log(f"bench: {p}: {why}")
    art = Artifacts(a, venv_py, pkg)
    results = {}
    for w in WORKLOADS:
        if a.only and w["key"] not in a.only:
            continue
        results[w["key"]] = {}
        load0 = os.getloadavg()[0]
        workload_run(a, w, art, venv_py, results[w["key"]])
        results[w["key"]]["loadavg"] = [load0, os.getloadavg()[0]]
    versions = sorted({r["version"] for res in results.values() for r in res.values()
                       if isinstance(r, dict) and "version" in r})
    meta = {"threads": a.threads, "date": time.strftime("%Y-%m-%d %H:%M"),
            "omp_wait_policy": "default" if a.omp_default else "PASSIVE",
            "seconds": round(time.time() - t0), "versions": versions}
    report(a, results, meta)
    log(f"bench: {time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
