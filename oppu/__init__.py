"""OPPU: One PEFT Per User — reusable logic behind the stage scripts."""

import logging
import warnings


def silence_known_noise() -> None:
    """Hide two third-party messages a user cannot act on, printed by every run: peft reads
    transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning for every adapter it
    wraps), and bitsandbytes, which peft imports, logs on CPUs with AVX-512 BF16 that an optional
    kernel package is missing ("Failed to load CPU gemm_4bit_forward"; 4-bit runs need CUDA here)."""
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


silence_known_noise()  # at import: every entry point imports oppu before peft
