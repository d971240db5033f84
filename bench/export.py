#!/usr/bin/python3
"""Exports a torchvision model with incept's weights for the peer engines (Debian's torch 1.13):
ONNX (opset 13, one file per batch size, static shapes) for onnxruntime and OpenVINO, and a
TorchScript trace at batch 1 that pnnx turns into ncnn's param/bin.

usage: export.py MODEL --weights W.safetensors --input CxHxW --num-classes K --out PREFIX
                 [--onnx-batches 1,16] [--torchscript]
Writes PREFIX_bN.onnx and PREFIX.pt, each through a temporary file and a rename."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchmodel import model_load  # noqa: E402


def file_replace(tmp, path):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--onnx-batches", default="")
    ap.add_argument("--torchscript", action="store_true")
    a = ap.parse_args()
    c, h, w = (int(v) for v in a.input.split("x"))
    torch.set_flush_denormal(True)
    m = model_load(a.model, a.num_classes, False, a.weights).eval()
    tmp = f"{a.out}.tmp.{os.getpid()}"
    with torch.no_grad():
        for b in [int(v) for v in a.onnx_batches.split(",") if v]:
            x = torch.zeros(b, c, h, w)
            torch.onnx.export(m, x, tmp, opset_version=13, input_names=["input"],
                              output_names=["logits"], do_constant_folding=True)
            file_replace(tmp, f"{a.out}_b{b}.onnx")
        if a.torchscript:
            torch.jit.trace(m, torch.zeros(1, c, h, w)).save(tmp)
            file_replace(tmp, f"{a.out}.pt")


if __name__ == "__main__":
    main()
