"""torchvision models with incept's weights, for both PyTorch builds the benchmark uses
(Debian's torch 1.13 and PyPI's current torch in the bench virtualenv).

Weights are read from the safetensors file one tensor at a time straight into the model's own
parameters, so loading adds no full copy of the weights to the peer's peak RSS."""
import json
import struct

import torch
import torchvision

_DTYPES = {"F32": torch.float32, "I64": torch.int64}


def model_build(name, num_classes, aux):
    """torchvision's NAME with random-init skipped where torchvision allows (weights come next)."""
    if name == "googlenet":
        return torchvision.models.googlenet(weights=None, aux_logits=aux, init_weights=False,
                                            num_classes=num_classes)
    if name == "vgg16":
        return torchvision.models.vgg16(weights=None, num_classes=num_classes)
    raise ValueError(f"no torchvision model for '{name}'")


def weights_load(module, path):
    """Copies every tensor of the safetensors file PATH into MODULE's state (strict: same keys
    and shapes on both sides)."""
    state = module.state_dict()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        base = 8 + n
        missing, extra = set(state) - set(header), set(header) - set(state)
        if missing or extra:
            raise ValueError(f"{path}: keys differ from torchvision's: missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        for name, info in header.items():
            dst = state[name]
            if list(dst.shape) != info["shape"] or _DTYPES.get(info["dtype"]) != dst.dtype:
                raise ValueError(f"{path}: tensor '{name}' is {info['dtype']} {info['shape']}, "
                                 f"torchvision has {dst.dtype} {list(dst.shape)}")
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path}: tensor '{name}' is cut short")
            if buf:
                dst.copy_(torch.frombuffer(buf, dtype=dst.dtype).reshape(dst.shape))
    return module


def model_load(name, num_classes, aux, path):
    return weights_load(model_build(name, num_classes, aux), path)
