"""fastmask.models: DiT baseline, MaskDiT, MicroDiT, SPRINT, TREAD, the EDM and DDPM preconditioners, the flow wrapper,
configs, FLOP count, checkpoint loading."""
from .checkpoint import from_lightningdit, from_published, infer_config, load_published, load_published_file, unwrap_state_dict
from .configs import (
    ARCHITECTURES, build_model, config_names, dit, maskdit, microdit, model_kwargs, register_architecture, sprint,
    tread,
)
from .dit import DiT, MaskDiT, compile_model, patchify, unpatchify
from .edm import DDPMDenoiser, EDMPrecond, draw_sigma, edm_coefficients
from .flops import count_flops, traced_flops
from .flow import FlowPrecond, draw_t
from .microdit import MicroDiT
from .sprint import SPRINT
from .tread import TREAD

__all__ = [
    "ARCHITECTURES",
    "register_architecture",
    "DDPMDenoiser",
    "DiT",
    "EDMPrecond",
    "FlowPrecond",
    "MaskDiT",
    "MicroDiT",
    "SPRINT",
    "TREAD",
    "build_model",
    "compile_model",
    "config_names",
    "count_flops",
    "dit",
    "microdit",
    "draw_sigma",
    "draw_t",
    "edm_coefficients",
    "from_lightningdit",
    "from_published",
    "infer_config",
    "load_published",
    "load_published_file",
    "maskdit",
    "model_kwargs",
    "sprint",
    "tread",
    "patchify",
    "unpatchify",
    "unwrap_state_dict",
]
