"""compressor: turn a trained PyTorch CNN into a smaller, faster, verified ONNX graph, with the numbers to prove it.

Public API::

    from compressor import compress, load_compressed
    result = compress("resnet56.th", arch="resnet56", data="train.npz", eval_data="test.npz",
                      normalize="imagenet", method="l1", target=0.33, out="runs/r56-l1")
    model = load_compressed("runs/r56-l1/compressed.pt")
"""

from importlib import import_module
from typing import Any

# Lazy re-exports: ``import compressor.models`` stays light; ``compressor.compress`` imports the pipeline on use.
_EXPORTS = {
    "CompressConfig": "config",
    "CompressionResult": "api",
    "CompressorError": "errors",
    "compress": "api",
    "create_model": "models",
    "list_archs": "models",
    "list_methods": "api",
    "load_compressed": "io",
    "load_model": "io",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


__all__ = [  # noqa: F822 - resolved lazily by __getattr__
    "CompressConfig",
    "CompressionResult",
    "CompressorError",
    "compress",
    "create_model",
    "list_archs",
    "list_methods",
    "load_compressed",
    "load_model",
]
__version__ = "0.1.0"
