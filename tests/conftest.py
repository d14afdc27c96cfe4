"""Shared fixtures: tiny random-weight models, built once per test session (stylekit.testing).

The environment is set here, at import, because huggingface_hub reads HF_HUB_OFFLINE and torch
reads OMP_NUM_THREADS when they are first imported; torch and diffusers load only inside the
fixtures that need them, so tests without models stay fast.
"""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach a model hub
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models gain nothing from more threads

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def offline_session():
    """Keep the whole session offline, even if a plugin imported huggingface_hub first."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def sd15_path(models_dir):
    """A tiny SD1.5-layout pipeline folder."""
    from stylekit.testing import build_sd15

    return build_sd15(models_dir / "sd15")


@pytest.fixture(scope="session")
def sd15_inpaint_path(models_dir):
    """A tiny SD1.5 inpainting pipeline folder (UNet with 9 input channels)."""
    from stylekit.testing import build_sd15

    return build_sd15(models_dir / "sd15-inpaint", in_channels=9)


@pytest.fixture(scope="session")
def sdxl_path(models_dir):
    """A tiny SDXL-layout pipeline folder (two text encoders, `up_blocks.0.attentions.1`)."""
    from stylekit.testing import build_sdxl

    return build_sdxl(models_dir / "sdxl")


@pytest.fixture(scope="session")
def tiny_vae_path(models_dir):
    """A tiny `AutoencoderTiny` (TAESD layout) folder."""
    from stylekit.testing import build_tiny_vae

    return build_tiny_vae(models_dir / "taesd")


@pytest.fixture(scope="session")
def sd15_lora(sd15_path, models_dir):
    """The `.safetensors` file of a random LoRA for `sd15_path`."""
    from stylekit.testing import build_lora

    return build_lora(sd15_path, models_dir / "sd15-lora")


@pytest.fixture(scope="session")
def sdxl_lora(sdxl_path, models_dir):
    """The `.safetensors` file of a random LoRA for `sdxl_path`."""
    from stylekit.testing import build_lora

    return build_lora(sdxl_path, models_dir / "sdxl-lora")


@pytest.fixture(scope="session")
def sd15_ip_adapter(sd15_path, models_dir):
    """A folder with `ip-adapter.safetensors` and `image_encoder/` for `sd15_path`."""
    from stylekit.testing import build_ip_adapter

    return build_ip_adapter(sd15_path, models_dir / "sd15-ip-adapter")


@pytest.fixture(scope="session")
def sdxl_ip_adapter(sdxl_path, models_dir):
    """A folder with `ip-adapter.safetensors` and `image_encoder/` for `sdxl_path`."""
    from stylekit.testing import build_ip_adapter

    return build_ip_adapter(sdxl_path, models_dir / "sdxl-ip-adapter")


@pytest.fixture(scope="session")
def sd15_single_file(sd15_path, models_dir):
    """`sd15_path` as one original-layout `.safetensors` checkpoint."""
    from stylekit.testing import save_single_file

    return save_single_file(sd15_path, models_dir / "sd15.safetensors")


@pytest.fixture(scope="session")
def sd2_path(models_dir):
    """A tiny SD 2.x-layout pipeline folder (OpenCLIP-like text encoder, v-prediction)."""
    from stylekit.testing import build_sd2

    return build_sd2(models_dir / "sd2")


@pytest.fixture(scope="session")
def sd2_single_file(sd2_path, models_dir):
    """`sd2_path` as one original-layout `.safetensors` checkpoint (OpenCLIP text encoder keys)."""
    from stylekit.testing import save_single_file

    return save_single_file(sd2_path, models_dir / "sd2.safetensors")


@pytest.fixture(scope="session")
def sd15_vpred_path(models_dir):
    """`sd15_path`'s weights with a v-prediction scheduler config."""
    from stylekit.testing import build_sd15

    return build_sd15(models_dir / "sd15-vpred", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def sd15_sample_path(models_dir):
    """`sd15_path`'s weights with a sample (x0) prediction scheduler config."""
    from stylekit.testing import build_sd15

    return build_sd15(models_dir / "sd15-sample", prediction_type="sample")


@pytest.fixture(scope="session")
def sd15_controlnet(sd15_path, models_dir):
    """A ControlNet for `sd15_path` (from_unet) with its zero convolutions filled with noise."""
    from stylekit.testing import build_controlnet

    return build_controlnet(sd15_path, models_dir / "sd15-controlnet", seed=1)


@pytest.fixture(scope="session")
def sd15_controlnet2(sd15_path, models_dir):
    """A second, differently seeded ControlNet for `sd15_path`."""
    from stylekit.testing import build_controlnet

    return build_controlnet(sd15_path, models_dir / "sd15-controlnet2", seed=2)


@pytest.fixture(scope="session")
def sdxl_controlnet(sdxl_path, models_dir):
    """A ControlNet for `sdxl_path` (from_unet) with its zero convolutions filled with noise."""
    from stylekit.testing import build_controlnet

    return build_controlnet(sdxl_path, models_dir / "sdxl-controlnet", seed=3)


@pytest.fixture(scope="session")
def depth_model_path(models_dir):
    """A tiny random Depth Anything model with its image processor."""
    from stylekit.testing import build_depth_model

    return build_depth_model(models_dir / "depth")
