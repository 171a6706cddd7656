"""fastmask.models: DiT baseline, MaskDiT, EDM preconditioning, configs, checkpoint loading."""
from .checkpoint import from_published, infer_config, load_published, load_published_file, unwrap_state_dict
from .configs import config_names, dit, maskdit, model_kwargs
from .dit import DiT, MaskDiT, patchify, unpatchify
from .edm import EDMPrecond

__all__ = [
    "DiT",
    "EDMPrecond",
    "MaskDiT",
    "config_names",
    "dit",
    "from_published",
    "infer_config",
    "load_published",
    "load_published_file",
    "maskdit",
    "model_kwargs",
    "patchify",
    "unpatchify",
    "unwrap_state_dict",
]
