"""The allow-list of diffusers classes a config may name.

A config selects a pipeline or scheduler by class name from these tables; nothing else can be
imported from YAML. Adding a model family means adding its class here.
"""

from __future__ import annotations

import diffusers

PIPELINES: dict[str, type] = {
    name: getattr(diffusers, name)
    for name in (
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableVideoDiffusionPipeline",
        "StableDiffusionControlNetPipeline",
        "StableDiffusionXLControlNetPipeline",
        "LatentConsistencyModelPipeline",
        "FluxPipeline",
        "StableDiffusion3Pipeline",
    )
}

SCHEDULERS: dict[str, type] = {
    name: getattr(diffusers, name)
    for name in (
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
        "EulerAncestralDiscreteScheduler",
        "EulerDiscreteScheduler",
        "FlowMatchEulerDiscreteScheduler",
        "LCMScheduler",
        "PNDMScheduler",
        "UniPCMultistepScheduler",
    )
}

VIDEO_PIPELINES = {"StableVideoDiffusionPipeline"}
CONTROLNET_PIPELINES = {"StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline"}


def task_of(pipeline: str) -> str:
    """What a pipeline consumes and produces: ``text2img``, ``controlnet`` or ``img2vid``."""
    if pipeline in VIDEO_PIPELINES:
        return "img2vid"
    if pipeline in CONTROLNET_PIPELINES:
        return "controlnet"
    return "text2img"
