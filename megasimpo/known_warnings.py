"""The warning filter every entry point installs first (``megasimpo``, the tools, the simulation
child): one home, below the commands that use it."""

import warnings

__all__ = ["quiet_known_warnings"]


def quiet_known_warnings() -> None:
    """Mutes the fallback notices Megatron-Core prints once per rank when TE/apex are absent
    and the deprecation notices of the torch APIs it uses; our own warnings stay visible."""
    for text in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "CUDA_DEVICE_MAX_CONNECTIONS", "full scope is deprecated",
                 "The .grad attribute of a Tensor that is not a leaf"):
        warnings.filterwarnings("ignore", message=f".*{text}")
    for module in ("torch.distributed", "megatron.core.dist_checkpointing", "megasimpo.parallel.cpu"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
