"""VSF / NAG / NASA guidance for diffusers pipelines (SD3/SD3.5, Flux, Wan 2.1/2.2, SD1.5/SDXL, Z-Image,
Flux.2 Klein, Flux.2 dev, Qwen-Image / Qwen-Image-Edit / Qwen-Image-Edit-Plus).

    from lib_vsf import from_preset
    from lib_vsf.diffusers import VSFGuidance

    with VSFGuidance(pipe, "blurry, watermark", from_preset("VSF Quality")) as vsf:
        image = vsf(prompt="a cat", num_inference_steps=8).images[0]
"""
from .family import GuidanceConflictError, GuidanceInputError, UnsupportedPipelineError  # noqa: F401
from .guidance import FAMILIES, VSFGuidance, family_for, generate, supported_pipelines  # noqa: F401
