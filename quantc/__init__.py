"""quantc: a mixed-precision, layer-wise post-training quantization compiler for LLMs."""
__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a compiled (GPTQ-format) checkpoint as a transformers model. See quantc.runtime.load."""
    from .runtime import load as _load
    return _load(path, **kwargs)


__all__ = ["load", "__version__"]
