"""Model zoo and registry: ``create_model(name, **cfg)``, ``list_models()``, ``from_module``, and
``load_checkpoint`` (a model rebuilt from a checkpoint file with its weights and contract).

Importing this package registers every family: ``segnet``, ``segnet_dsc`` (segnet.py), ``unet``
(unet.py: the classic U-Net, or SMP's U-Net over a pretrained-ready encoder), ``vit``, ``segformer``,
``fpn`` (fpn.py) and ``deeplabv3plus`` (deeplab.py) over an encoder (encoders.py, weights.py,
encoder_decoder.py), and torchvision's ``fcn_resnet50``, ``deeplabv3_mobilenet``, ``lraspp_mobilenet``
lifted with ``from_module`` (lifted.py).
"""

from . import deeplab, fpn, lifted, segformer, segnet, unet, vit
from .base import Model, build_cfg, check_cfg, create_model, from_module, list_models, register_model
from .encoder_decoder import freeze_encoder, model_encoder
from .encoders import Encoder, EncoderError, create_encoder
from .saved import Loaded, check_model, load_checkpoint, model_metadata
from .weights import EncoderWeightsError, check_encoder_weights, fetch_encoder_weights

__all__ = [
    "Model", "build_cfg", "check_cfg", "create_model", "from_module", "list_models", "register_model",
    "Loaded", "check_model", "load_checkpoint", "model_metadata",
    "Encoder", "EncoderError", "create_encoder", "freeze_encoder", "model_encoder",
    "EncoderWeightsError", "check_encoder_weights", "fetch_encoder_weights",
    "deeplab", "fpn", "lifted", "segformer", "segnet", "unet", "vit",
]
