"""Model zoo and registry: ``create_model(name, **cfg)``, ``list_models()``, ``from_module``, and
``load_checkpoint`` (a model rebuilt from a checkpoint file with its weights and contract).

Importing this package registers every family: ``segnet``, ``segnet_dsc`` (segnet.py), ``unet``,
``vit``, ``segformer``, and torchvision's ``fcn_resnet50``, ``deeplabv3_mobilenet``,
``lraspp_mobilenet`` lifted with ``from_module`` (lifted.py).
"""

from . import lifted, segformer, segnet, unet, vit
from .base import Model, build_cfg, check_cfg, create_model, from_module, list_models, register_model
from .saved import Loaded, check_model, load_checkpoint, model_metadata

__all__ = [
    "Model", "build_cfg", "check_cfg", "create_model", "from_module", "list_models", "register_model",
    "Loaded", "check_model", "load_checkpoint", "model_metadata",
    "lifted", "segformer", "segnet", "unet", "vit",
]
