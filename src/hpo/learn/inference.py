"""Using the final model: predict the class of image files, and export a self-contained model file."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hpo.errors import DataError, HpoError
from hpo.learn.checkpoints import load_final, write_atomic
from hpo.learn.data import CLASSES, MEAN, STD
from hpo.learn.model import Ensemble, InputShape, with_weights
from hpo.learn.params import TrialParams
from hpo.learn.train import logits_of

EXPORT_FORMATS = {"torchscript": ".ts", "onnx": ".onnx"}


CPU = torch.device("cpu")
# What a checkpoint written before the [data] section holds: a Fashion-MNIST model.
FASHION_MNIST_INFO = {
    "source": "fashion-mnist",
    "classes": list(CLASSES),
    "channels": 1,
    "image_size": 28,
    "mean": [MEAN],
    "std": [STD],
    "light_on_dark": True,
}


def data_info(meta: dict[str, Any]) -> dict[str, Any]:
    """What the model takes and gives (channels, side, statistics, class names), from its checkpoint."""
    return meta.get("data") or FASHION_MNIST_INFO


def load_model(path: Path, study: str | None = None, device: torch.device = CPU) -> tuple[Ensemble, dict[str, Any]]:
    """The final model (an ensemble of one or more members) in eval mode, and its checkpoint's
    metadata (everything but the weights)."""
    checkpoint = load_final(path, study)
    info = data_info(checkpoint)
    shape = InputShape(int(info["channels"]), int(info["image_size"]), len(info["classes"]))
    members = []
    for member in checkpoint["members"]:
        members.append(with_weights(TrialParams.from_flat(member["params"]).model.shaped(shape), member["state_dict"]))
    ensemble = Ensemble(members, checkpoint["tta"]).to(device).to(memory_format=torch.channels_last).eval()
    meta = {k: v for k, v in checkpoint.items() if k != "members"}
    meta["data"] = info
    meta["members"] = [{k: v for k, v in m.items() if k != "state_dict"} for m in checkpoint["members"]]
    return ensemble, meta


# --------------------------------------------------------------------------- predict


class ImageError(Exception):
    """One input file could not be turned into the model's input; the others go on."""


def read_image(path: Path, info: dict[str, Any] = FASHION_MNIST_INFO) -> np.ndarray:
    """Any PNG or JPEG as the uint8 input of a model trained on `info`'s data: (C, S, S) as a folder
    data set's images were read (hpo.learn.readers.decode_image), or, for MNIST-style grey data, (S, S) as a
    light object on a dark background, centred and padded to a square before resizing."""
    if not path.exists():
        raise ImageError("no such file")
    if path.is_dir():
        raise ImageError("is a directory, not an image")
    size = int(info["image_size"])
    if not info.get("light_on_dark"):
        from hpo.learn.readers import decode_image

        try:
            return decode_image(path, size, int(info["channels"]))
        except DataError as e:
            raise ImageError(str(e).removeprefix(f"{path}: ")) from None
    return _mnist_style(path, size)


def _mnist_style(path: Path, size: int) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError("not an image PIL can read (expected PNG or JPEG)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"corrupt image data ({e})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are background: lay the image on white, the usual product-photo backdrop.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    grey = np.asarray(image.convert("L"), dtype=np.uint8)
    if grey.size == 0:
        raise ImageError("the image is empty")
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if border.mean() > 127:  # a dark object on a light background: Fashion-MNIST is the other way round
        grey = 255 - grey
    h, w = grey.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = grey
    if side != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
    return square


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str | None = None
    probability: float | None = None
    top: tuple[tuple[str, float], ...] = ()
    error: str | None = None


def predict_files(
    model: nn.Module, paths: list[Path], top: int = 1, batch_size: int = 256, info: dict[str, Any] = FASHION_MNIST_INFO
) -> list[Prediction]:
    """One Prediction per path, in order; a file that cannot be read gets an error instead of a label."""
    results: dict[int, Prediction] = {}
    readable: list[tuple[int, np.ndarray]] = []
    classes = list(info["classes"])
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)
    for i, path in enumerate(paths):
        try:
            readable.append((i, read_image(path, info)))
        except ImageError as e:
            results[i] = Prediction(str(path), error=str(e))
    device = next(model.parameters()).device
    for start in range(0, len(readable), batch_size):
        chunk = readable[start : start + batch_size]
        pixels = np.stack([img if img.ndim == 3 else img[None] for _, img in chunk])  # (N, C, S, S)
        x = (torch.from_numpy(pixels).float() / 255.0 - mean) / std
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        probs = logits_of(model, x).float().softmax(1).cpu()
        values, indices = probs.topk(min(top, len(classes)), dim=1)
        for (i, _), value, key in zip(chunk, values.tolist(), indices.tolist()):
            ranked = tuple((classes[c], p) for c, p in zip(key, value))
            results[i] = Prediction(str(paths[i]), ranked[0][0], ranked[0][1], ranked)
    return [results[i] for i in range(len(paths))]


# --------------------------------------------------------------------------- export


class Exportable(nn.Module):
    """The model with its input normalisation built in: float32 (N, C, S, S) pixels in [0, 1] ->
    log-probabilities (the ensemble's averaged softmax, in logs)."""

    def __init__(self, model: nn.Module, info: dict[str, Any] = FASHION_MNIST_INFO):
        super().__init__()
        self.model = model
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(info["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(info["std"], dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) / self.std)


def input_text(info: dict[str, Any]) -> str:
    """The exported file's input, in words: `float32 (N, 1, 28, 28), pixels in [0, 1], light on dark`."""
    side = info["image_size"]
    order = ", light on dark" if info.get("light_on_dark") else ", RGB" if info["channels"] == 3 else ""
    return f"float32 (N, {info['channels']}, {side}, {side}), pixels in [0, 1]{order}"


def export_metadata(meta: dict[str, Any]) -> dict[str, str]:
    info = data_info(meta)
    return {
        "classes": json.dumps(list(info["classes"])),
        "input": input_text(info),
        "normalisation": json.dumps({"mean": info["mean"], "std": info["std"]}),
        "output": f"log-probabilities (N, {len(info['classes'])}): softmax or argmax them",
        "study": str(meta["study"]),
        "trial": str(meta["trial"]),
        "members": json.dumps([m["trial"] for m in meta["members"]]),
        "tta": str(meta["tta"]),
        "test_accuracy": str(meta["test_accuracy"]),
        "hpo_version": str(meta["hpo_version"]),
        "params": json.dumps([m["params"] for m in meta["members"]]),
    }


def export(model: nn.Module, meta: dict[str, Any], fmt: str, out: Path) -> None:
    """Write a self-contained model file: weights, graph, normalisation and class names."""
    info = data_info(meta)
    wrapped = Exportable(model.float().to(memory_format=torch.contiguous_format), info).cpu().eval()
    example = torch.rand(2, int(info["channels"]), int(info["image_size"]), int(info["image_size"]))
    metadata = export_metadata(meta)
    buffer = io.BytesIO()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.export, but TorchScript still loads from C++ and
            # older runtimes without Python, which is why people ask for it.
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(wrapped, example)
            torch.jit.save(traced, buffer, _extra_files={"hpo.json": json.dumps(metadata)})
    elif fmt == "onnx":
        try:
            import onnx
        except ImportError as e:
            raise HpoError("--format onnx needs the onnx packages: pip install 'hpo-service[onnx]'") from e
        batch = torch.export.Dim("batch", min=1, max=65536)
        for name in ("onnxscript", "onnx_ir"):  # they log every optimisation pass at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every pass
            program = torch.onnx.export(
                wrapped,
                (example,),
                None,
                input_names=["image"],
                output_names=["log_probs"],
                dynamic_shapes={"image": {0: batch}},
                dynamo=True,
            )
        assert program is not None  # dynamo=True always returns the program
        proto = program.model_proto
        for key, value in metadata.items():
            proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
        onnx.checker.check_model(proto)
        buffer.write(proto.SerializeToString())
    else:
        raise HpoError(f"unknown export format {fmt!r}. Use one of: {', '.join(EXPORT_FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, buffer.getvalue())


def run_exported(path: Path, fmt: str, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Outputs of an exported file on uint8 (N, C, S, S) images (or grey (N, S, S)), through its own runtime."""
    x = _channels(images).astype(np.float32) / 255.0
    outputs = []
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation, as in export()
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                outputs.append(loaded(torch.from_numpy(x[start : start + batch_size])).numpy())
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for start in range(0, len(x), batch_size):
            outputs.append(session.run(["log_probs"], {"image": x[start : start + batch_size]})[0])
    return np.concatenate(outputs)


def reference_logits(
    model: nn.Module, images: np.ndarray, info: dict[str, Any] = FASHION_MNIST_INFO, batch_size: int = 1000
) -> np.ndarray:
    """The PyTorch model's fp32 outputs on the same inputs, for comparing an export against."""
    wrapped = Exportable(model, info).cpu().eval()
    x = torch.from_numpy(_channels(images).astype(np.float32) / 255.0)
    with torch.inference_mode():
        return np.concatenate([wrapped(x[s : s + batch_size]).numpy() for s in range(0, len(x), batch_size)])


def _channels(images: np.ndarray) -> np.ndarray:
    return images[:, None] if images.ndim == 3 else images


@dataclass(frozen=True)
class ExportCheck:
    images: int
    max_diff: float  # largest |log-probability| difference, exported file against PyTorch
    agree: float  # share of images given the same class
    close: bool  # every output within 1e-4 (absolute, plus 1e-4 relative) of PyTorch's

    @property
    def ok(self) -> bool:
        return self.close and self.agree == 1.0


def check_export(
    model: torch.nn.Module, target: Path, fmt: str, images: np.ndarray, info: dict[str, Any] = FASHION_MNIST_INFO
) -> ExportCheck:
    """The exported file, run by its own runtime, against the PyTorch model on uint8 (N, C, S, S) `images`."""
    exported = run_exported(target, fmt, images)
    reference = reference_logits(model, images, info)
    return ExportCheck(
        len(images),
        float(np.abs(exported - reference).max()),
        float((exported.argmax(1) == reference.argmax(1)).mean()),
        bool(np.allclose(exported, reference, rtol=1e-4, atol=1e-4)),
    )
