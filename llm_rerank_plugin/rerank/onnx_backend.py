"""ONNX Runtime backends of :class:`~llm_rerank_plugin.rerank.encoder.TextEncoder`.

``onnx`` runs the same transformer exported to ONNX (fp32); ``onnx-int8`` runs that export after
ONNX Runtime's dynamic int8 quantization (int8 weights, activations quantized per call), which is
what makes the cold path (a user text encoded on the request) cheap on a CPU.

The export (``torch.onnx.export``, the TorchScript exporter) and the quantization are done by this
package from the local model folder, once: the files are cached under
``<cache_dir>/<model>-<digest>/`` where the digest covers the model fingerprint (weights and config),
the opset and the torch / onnxruntime versions, and the file name is the backend's. Every export is
checked against torch on a batch of another size and length before it is kept, so a graph that
traced a shape as a constant is an error, not wrong vectors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BACKENDS",
    "ONNX_BACKENDS",
    "OPSET",
    "OnnxEncoderRuntime",
    "OnnxExportError",
    "OnnxRuntimeMissingError",
    "check_backend",
    "default_onnx_cache_dir",
    "ensure_onnx_model",
    "load_onnx_runtime",
    "require_onnxruntime",
]

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")
ONNX_BACKENDS = ("onnx", "onnx-int8")
# 17 has every op a BERT-style encoder exports to with the TorchScript exporter (incl. LayerNormalization).
OPSET = 17
_FILES = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx"}
# Per-channel int8 weights: per-tensor scales lose too much on MiniLM (mean cosine to fp32 0.964 on 500
# ML-100k item texts, against 0.992); reduce_range (7-bit weights) guards against the u8s8 overflow of
# CPUs without VNNI (AVX2) and measured no worse (0.9920 vs 0.9915 without it) nor slower.
_INT8_OPTIONS = {"per_channel": True, "reduce_range": True}
_INSTALL_HINT = "pip install onnxruntime==1.26.0 onnx==1.17.0 ml-dtypes==0.5.4"
# Export check: mean-pooled vectors of torch and ONNX Runtime must agree this closely (fp32 export).
_EXPORT_MIN_COSINE = 0.999
_CHECK_TEXTS = ["an export check sentence that is a little longer than the others", "short", "x y"]
_EXPORT_TEXTS = ["a sample sentence for the export", "another one"]


class OnnxRuntimeMissingError(ImportError):
    """An ONNX backend was asked for but onnxruntime (or onnx, for export/quantization) is not installed."""


class OnnxExportError(RuntimeError):
    """The model could not be exported to ONNX, or the export disagrees with torch."""


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else a ValueError naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"encoder backend {backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or :class:`OnnxRuntimeMissingError` saying what to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxRuntimeMissingError(
            f"encoder backend onnx / onnx-int8 needs onnxruntime, which cannot be imported ({exc}); "
            f"run `{_INSTALL_HINT}` or use encoder_backend: torch"
        ) from None
    return onnxruntime


def _require_onnx_tools() -> None:
    """Export and quantization also need the ``onnx`` package (and ml_dtypes, for the quantizer)."""
    try:
        import onnx  # noqa: F401
        from onnxruntime.quantization import quantize_dynamic  # noqa: F401
    except ImportError as exc:
        raise OnnxRuntimeMissingError(
            f"exporting / quantizing the encoder for ONNX Runtime needs onnx and ml_dtypes ({exc}); "
            f"run `{_INSTALL_HINT}`"
        ) from None


def default_onnx_cache_dir() -> Path:
    """``$LLM_RERANK_CACHE/onnx``, else ``~/.cache/llm_rerank_plugin/onnx``."""
    from llm_rerank_plugin.data.movielens import default_cache_dir

    return default_cache_dir() / "onnx"


def _cache_folder(fingerprint: str, cache_dir: Path, opset: int) -> Path:
    ort = require_onnxruntime()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(fingerprint.split("@")[0]).name)[:40] or "model"
    key = (
        f"{fingerprint}|opset={opset}|torch={torch.__version__}|onnxruntime={ort.__version__}"
        f"|int8={sorted(_INT8_OPTIONS.items())}"
    )
    return cache_dir / f"{slug}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:16]}"


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on ``folder`` so workers starting together export once, not once each."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent exports only duplicate work; os.replace keeps files whole
        yield
        return
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _publish(tmp: Path, out: Path) -> None:
    """Atomically move a finished file into place, readable like any file this user creates."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; other users of a shared cache must read it
    os.replace(tmp, out)


def _tmp_path(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(tmp)


class _LastHidden(torch.nn.Module):
    """Positional-tensor wrapper: the exporter traces ``forward(*tensors)`` into named graph inputs."""

    def __init__(self, net: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.net, self.names = net, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.net(**dict(zip(self.names, tensors, strict=True))).last_hidden_state


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean over tokens, then L2 normalisation, in float32: the torch path's pooling."""
    m = mask.astype(np.float32)[..., None]
    pooled = (hidden.astype(np.float32) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
    norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)  # F.normalize's eps
    return (pooled / norms).astype(np.float32, copy=False)


def _export(model_path: str, tokenizer: Any, out: Path, opset: int, max_length: int) -> None:
    from transformers import AutoModel

    net = AutoModel.from_pretrained(model_path, local_files_only=True).float().eval()
    sample = tokenizer(
        _EXPORT_TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    names = list(sample.keys())
    # eval() on the wrapper too: the exporter restores the wrapper's mode afterwards, recursively
    wrapper = _LastHidden(net, names).eval()
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    tmp = _tmp_path(out.parent, out.name)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes
            torch.onnx.export(
                wrapper,
                tuple(sample[n] for n in names),
                str(tmp),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        _check_export(tmp, net, tokenizer, max_length)
        _publish(tmp, out)
    except OnnxExportError:
        raise
    except Exception as exc:
        raise OnnxExportError(f"exporting {model_path} to ONNX (opset {opset}) failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _check_export(path: Path, net: torch.nn.Module, tokenizer: Any, max_length: int) -> None:
    """Compare the export with torch on a batch of another size and length than the traced one."""
    ort = require_onnxruntime()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    enc = tokenizer(_CHECK_TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        ref = net(**enc).last_hidden_state.numpy()
    feeds = {i.name: enc[i.name].numpy().astype(np.int64) for i in session.get_inputs()}
    got = session.run(None, feeds)[0]
    mask = enc["attention_mask"].numpy()
    cos = (_mean_pool(ref, mask) * _mean_pool(got, mask)).sum(axis=1)
    if not np.all(cos >= _EXPORT_MIN_COSINE):
        raise OnnxExportError(
            f"the ONNX export disagrees with torch (pooled-vector cosine {cos.min():.4f} < "
            f"{_EXPORT_MIN_COSINE}) on a batch shaped unlike the export sample; the model's forward "
            "likely branches on shapes that the tracer froze; use encoder_backend: torch for this model"
        )


class _DropQuantizerAdvice(logging.Filter):
    """The quantizer advises "pre-processing" on the root logger at every call; it does not apply here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root, advice = logging.getLogger(), _DropQuantizerAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _quantize(src: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = _tmp_path(out.parent, out.name)
    try:
        with _quiet_root_logger():
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, **_INT8_OPTIONS)
        _publish(tmp, out)
    except Exception as exc:
        raise OnnxExportError(f"dynamic int8 quantization of {src} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def ensure_onnx_model(
    model_path: str,
    fingerprint: str,
    backend: str,
    tokenizer: Any,
    cache_dir: str | os.PathLike[str] | None = None,
    opset: int = OPSET,
    max_length: int = 128,
) -> Path:
    """Path of the cached ONNX file for ``backend``, exporting (and quantizing) it first if absent.

    ``fingerprint`` is :func:`~llm_rerank_plugin.rerank.encoder.model_fingerprint` of ``model_path``:
    re-saved weights get a new folder, so a stale export is never used.
    """
    if backend not in ONNX_BACKENDS:
        raise ValueError(f"ONNX backend must be one of {', '.join(ONNX_BACKENDS)}, got {backend!r}")
    folder = _cache_folder(fingerprint, Path(cache_dir or default_onnx_cache_dir()), opset)
    target = folder / _FILES[backend]
    if target.is_file():
        return target
    _require_onnx_tools()
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):
        fp32 = folder / _FILES["onnx"]
        if not fp32.is_file():
            logger.info("exporting %s to ONNX (opset %d) under %s", model_path, opset, folder)
            _export(model_path, tokenizer, fp32, opset, max_length)
        if backend == "onnx-int8" and not target.is_file():
            logger.info("quantizing %s to dynamic int8", fp32)
            _quantize(fp32, target)
        (folder / "manifest.json").write_text(
            json.dumps(
                {
                    "model": model_path,
                    "fingerprint": fingerprint,
                    "opset": opset,
                    "torch": torch.__version__,
                    "onnxruntime": require_onnxruntime().__version__,
                    "files": sorted(p.name for p in folder.glob("*.onnx")),
                },
                indent=2,
            )
        )
    return target


def _providers(device: str, backend: str) -> tuple[list[str], torch.device]:
    ort = require_onnxruntime()
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    kind = torch.device(device).type if device != "auto" else "auto"
    if kind == "cuda":
        if backend == "onnx-int8":
            raise ValueError(
                "encoder backend onnx-int8 runs on the CPU (ONNX Runtime's dynamic int8 kernels are CPU "
                "kernels); use device cpu, or backend onnx / torch on CUDA"
            )
        if not has_cuda:
            raise RuntimeError(
                f"device={device!r} with encoder backend onnx needs onnxruntime-gpu (CUDAExecutionProvider); "
                f"this onnxruntime offers {available}; use device cpu or backend torch"
            )
    elif kind not in ("cpu", "auto"):
        raise ValueError(
            f"device {device!r} is not supported by the ONNX backends; expected auto, cpu or cuda"
        )
    use_cuda = kind == "cuda" or (
        kind == "auto" and backend == "onnx" and has_cuda and torch.cuda.is_available()
    )
    if use_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], torch.device("cuda")
    return ["CPUExecutionProvider"], torch.device("cpu")


class OnnxEncoderRuntime:
    """ONNX Runtime sessions over one exported encoder, returning mean-pooled unit vectors.

    The session's intra-op thread count follows ``torch.get_num_threads()`` at call time (one session
    per count, made on first use), so ``torch.set_num_threads`` governs both backends alike: one thread
    for a serving worker, all cores for catalogue encoding. Sessions are not pickled; a copy sent to
    another process (a Dask worker) opens its own.
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "auto", backend: str = "onnx") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        self.providers, self.device = _providers(device, backend)
        self._sessions: dict[int, Any] = {}
        self.session(1)  # fail here, not on the first request, when the file cannot be loaded
        self.input_names = [i.name for i in self._sessions[1].get_inputs()]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state

    def session(self, threads: int) -> Any:
        ort = require_onnxruntime()
        threads = max(1, int(threads))
        if threads not in self._sessions:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[threads] = ort.InferenceSession(
                str(self.path), sess_options=opts, providers=self.providers
            )
        return self._sessions[threads]

    def embed(self, enc: dict[str, np.ndarray]) -> np.ndarray:
        """Pooled, L2-normalised float32 vectors of one tokenized batch (numpy int arrays)."""
        missing = [n for n in self.input_names if n not in enc]
        if missing:
            raise ValueError(
                f"the tokenizer did not produce {missing}, which the ONNX model {self.path} needs"
            )
        feeds = {n: np.asarray(enc[n], dtype=np.int64) for n in self.input_names}
        hidden = self.session(torch.get_num_threads()).run(None, feeds)[0]
        return _mean_pool(hidden, np.asarray(enc["attention_mask"]))


def load_onnx_runtime(
    model_path: str,
    fingerprint: str,
    backend: str,
    tokenizer: Any,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    max_length: int = 128,
    opset: int = OPSET,
) -> OnnxEncoderRuntime:
    """The runtime for ``backend`` over the cached export, exporting first when needed.

    A cached file that ONNX Runtime cannot load (truncated by a full disk, say) is removed and made
    again once; the second failure is raised.
    """
    _providers(device, backend)  # a bad device is reported before minutes of export, and not retried
    path = ensure_onnx_model(model_path, fingerprint, backend, tokenizer, cache_dir, opset, max_length)
    try:
        return OnnxEncoderRuntime(path, device=device, backend=backend)
    except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        logger.warning("cached ONNX model %s cannot be loaded (%s); exporting it again", path, exc)
    # The int8 file is derived from the fp32 one, which may be the damaged one: remake both.
    for name in _FILES.values():
        (path.parent / name).unlink(missing_ok=True)
    path = ensure_onnx_model(model_path, fingerprint, backend, tokenizer, cache_dir, opset, max_length)
    return OnnxEncoderRuntime(path, device=device, backend=backend)
