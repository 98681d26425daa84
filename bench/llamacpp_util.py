"""Opening a model with llama-cpp-python for the reference measurements in bench/.

On this class of machine (Sapphire Rapids VM), llama.cpp 0.3.36's AMX extra
buffer type crashes inside ggml_backend_amx_mul_mat during decode (SIGSEGV, seen
with SmolLM2 Q4_1), although the kernel grants AMX tile permission. Reference
runs therefore load models with use_extra_bufts = False; this changes which
CPU kernels llama.cpp uses, not its numerics beyond float rounding.
"""
from llama_cpp import llama_cpp as _C
import llama_cpp


def _params_without_extra_bufts():
    p = _orig_default_params()
    p.use_extra_bufts = False
    return p


_orig_default_params = _C.llama_model_default_params


def open_llama(model_path, **kwargs):
    """llama_cpp.Llama(model_path, **kwargs) with extra buffer types off."""
    _C.llama_model_default_params = _params_without_extra_bufts
    try:
        import llama_cpp.llama as L
        L.llama_cpp.llama_model_default_params = _params_without_extra_bufts
        return llama_cpp.Llama(model_path=model_path, verbose=False, **kwargs)
    finally:
        _C.llama_model_default_params = _orig_default_params
