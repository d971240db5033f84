"""One peer engine in a process of its own, driven by bench/compare.py through a pipe.

usage: peer.py ENGINE MODEL --batch N --input CxHxW --threads T --num-classes K
               [--train [--aux]] (--weights W.safetensors | --file MODEL_FILE)
ENGINE: torch (whichever torch this python has: Debian's 1.13 under /usr/bin/python3, PyPI's in
the bench virtualenv), onnxruntime, openvino, ncnn (MODEL_FILE is then the .ncnn.param, with
the .ncnn.bin beside it).

Protocol: one JSON object per line. After setup (model loaded, two warm-up runs) the peer sends
{"ok": true, "version": V, "check": [outputs]} or {"error": "why"}, where the outputs are the
first image's for the input times --check-scale (inference only). Then, per request line:
{"cmd": "run", "iters": K} -> {"times": [K seconds], "cpu": process CPU s / wall s};
{"cmd": "rss"} -> {"rss_mib": peak RSS}; {"cmd": "quit"} or end of input -> exit.
Everything runs in float32 on the CPU with exactly T threads; the input is
numpy.random.RandomState(1).standard_normal, the same in every process."""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def check_input(batch, c, h, w):
    return np.random.RandomState(1).standard_normal((batch, c, h, w)).astype(np.float32)


class TorchPeer:
    def __init__(self, a, x):
        import torch
        sys.path.insert(0, HERE)
        from torchmodel import model_load
        torch.set_num_threads(a.threads)
        torch.set_flush_denormal(True)
        self.version = "torch " + torch.__version__
        self.torch = torch
        self.m = model_load(a.model, a.num_classes, a.train and a.aux, a.weights)
        self.x = torch.from_numpy(x)
        if a.train:
            self.m.train()
            self.y = torch.from_numpy(np.random.RandomState(2).randint(0, a.num_classes, len(x)))
            self.opt = torch.optim.SGD(self.m.parameters(), lr=0.01, momentum=0.9)
            self.aux = a.aux
            self.check = None
        else:
            self.m.eval()
            with torch.no_grad():
                self.check = self.m(self.x * a.check_scale)[0].numpy()

    def step(self):
        torch = self.torch
        if not hasattr(self, "opt"):
            with torch.no_grad():
                self.m(self.x)
            return
        # One SGD-momentum step as incept bench --train does it: mean cross-entropy of the
        # logits plus 0.3 x each aux head's, backward, update.
        self.opt.zero_grad(set_to_none=True)
        out = self.m(self.x)
        ce = torch.nn.functional.cross_entropy
        if self.aux:
            loss = ce(out.logits, self.y) + 0.3 * (ce(out.aux_logits1, self.y)
                                                   + ce(out.aux_logits2, self.y))
        else:
            loss = ce(out, self.y)
        loss.backward()
        self.opt.step()


class OnnxruntimePeer:
    def __init__(self, a, x):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.s = ort.InferenceSession(a.file, so, providers=["CPUExecutionProvider"])
        self.version = "onnxruntime " + ort.__version__
        self.feed = {self.s.get_inputs()[0].name: x}
        name = self.s.get_inputs()[0].name
        self.check = self.s.run(None, {name: x * a.check_scale})[0][0]

    def step(self):
        self.s.run(None, self.feed)


class OpenvinoPeer:
    def __init__(self, a, x):
        import openvino as ov
        core = ov.Core()
        # f32 explicitly: on CPUs with AVX-512 BF16 OpenVINO's default precision is bf16.
        # One stream of T threads runs the whole batch, as every other engine here does.
        self.c = core.compile_model(core.read_model(a.file), "CPU", {
            "INFERENCE_NUM_THREADS": a.threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        got = str(self.c.get_property("INFERENCE_PRECISION_HINT"))
        if "32" not in got:
            raise RuntimeError(f"OpenVINO compiled the model in {got}, not f32")
        self.version = "openvino " + ov.__version__.split("-")[0]
        self.r = self.c.create_infer_request()
        self.x = x
        self.r.infer({0: x * a.check_scale})
        self.check = np.array(self.r.get_output_tensor(0).data[0])

    def step(self):
        self.r.infer({0: self.x})


class NcnnPeer:
    def __init__(self, a, x):
        import ncnn
        self.ncnn = ncnn
        net = ncnn.Net()
        net.opt.num_threads = a.threads
        net.opt.use_vulkan_compute = False
        # float32 storage and arithmetic everywhere, like the other engines
        for opt in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic",
                    "use_bf16_storage", "use_int8_inference"):
            if hasattr(net.opt, opt):
                setattr(net.opt, opt, False)
        if net.load_param(a.file) or net.load_model(a.file[:-len(".param")] + ".bin"):
            raise RuntimeError(f"ncnn could not load {a.file} and its .bin")
        self.net = net
        self.version = "ncnn " + ncnn.__version__
        # ncnn runs one image at a time: a batch is a loop over its images.
        # ncnn.Mat may point into the numpy arrays without owning them: keep them alive.
        self.imgs = [np.ascontiguousarray(img) for img in x]
        self.mats = [ncnn.Mat(img) for img in self.imgs]
        x1 = np.ascontiguousarray(x[0] * a.check_scale)
        self.check = self.run_one(ncnn.Mat(x1))

    def run_one(self, mat):
        ex = self.net.create_extractor()
        ex.input("in0", mat)
        rc, out = ex.extract("out0")
        if rc:
            raise RuntimeError(f"ncnn extract failed ({rc})")
        return np.array(out).reshape(-1)

    def step(self):
        for mat in self.mats:
            self.run_one(mat)


ENGINES = {"torch": TorchPeer, "onnxruntime": OnnxruntimePeer, "openvino": OpenvinoPeer,
           "ncnn": NcnnPeer}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=sorted(ENGINES))
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--input", default="3x224x224")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--aux", action="store_true")
    ap.add_argument("--weights")
    ap.add_argument("--file")
    ap.add_argument("--check-scale", type=float, default=1.0)
    a = ap.parse_args()
    # The protocol gets its own copy of stdout; the libraries' own prints go to stderr (the log).
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        c, h, w = (int(v) for v in a.input.split("x"))
        peer = ENGINES[a.engine](a, check_input(a.batch, c, h, w))
        for _ in range(2):      # warm-up: allocations, lazy compilation, caches
            peer.step()
    except Exception as e:      # any failure is reported to the driver, one line
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        send({"error": msg[:300]})
        return 1
    check = None if peer.check is None else [float(v) for v in np.asarray(peer.check).reshape(-1)]
    send({"ok": True, "version": peer.version, "check": check})
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "run":
            times = []
            t0, c0 = time.perf_counter(), os.times()
            for _ in range(req["iters"]):
                t = time.perf_counter()
                peer.step()
                times.append(time.perf_counter() - t)
            wall, c1 = time.perf_counter() - t0, os.times()
            send({"times": times, "cpu": (c1.user - c0.user + c1.system - c0.system) / wall})
        elif req["cmd"] == "rss":
            send({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})
        else:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
