"""Shared helpers for the Python tests: run the incept CLI, read/write safetensors
independently of incept's own reader (straight from the format spec), compare tensors."""
import json, os, struct, subprocess, tempfile
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.environ.get("INCEPT_BIN", os.path.join(ROOT, "incept"))
BUILD = os.environ.get("INCEPT_BUILD", os.path.join(ROOT, "build"))

_DT = {"F32": (torch.float32, 4), "I64": (torch.int64, 8), "F64": (torch.float64, 8),
       "I32": (torch.int32, 4), "U8": (torch.uint8, 1), "F16": (torch.float16, 2)}
_DT_OF = {v[0]: k for k, v in _DT.items()}


def tmpdir():
    """A fresh temporary directory (removed at interpreter exit)."""
    d = tempfile.TemporaryDirectory(prefix="incept-test-")
    _keep.append(d)
    return d.name


_keep = []


def st_save(path, tensors, metadata=None):
    """Writes {name: torch.Tensor} as safetensors (header padded to 8 bytes, like the Rust lib)."""
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        b = t.numpy().tobytes()
        header[name] = {"dtype": _DT_OF[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def st_load(path, with_meta=False):
    """Reads a safetensors file into {name: torch.Tensor} (and its metadata if asked)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, info in header.items():
        dt, size = _DT[info["dtype"]]
        b, e = info["data_offsets"]
        arr = np.frombuffer(data[base + b:base + e], dtype=torch.empty(0, dtype=dt).numpy().dtype)
        out[name] = torch.from_numpy(arr.copy()).reshape(info["shape"])
    return (out, meta) if with_meta else out


def run(args, rc=0, timeout=600):
    """Runs ./incept ARGS; asserts the exit code; returns (stdout, stderr)."""
    p = subprocess.run([BIN] + [str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout)
    if rc is not None and p.returncode != rc:
        raise AssertionError(f"incept {' '.join(map(str, args))}: exit {p.returncode}, "
                             f"wanted {rc}; stderr: {p.stderr.strip()[-1500:]}")
    return p.stdout, p.stderr


def rel_err(got, ref):
    """max|got-ref| / max(max|ref|, tiny): one number per tensor, robust to near-zero entries."""
    got = torch.as_tensor(got).double()
    ref = torch.as_tensor(ref).double()
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item() if ref.numel() else 0.0


def assert_close(got, ref, tol, what):
    e = rel_err(got, ref)
    if not (e <= tol):
        raise AssertionError(f"{what}: relative error {e:.3g} > {tol:g}")
    return e
