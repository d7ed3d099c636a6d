"""Training from scratch under a numerics policy: layers, models, optimizers, the training loop.

See docs/training.md.
"""

from .core import Context, LayerCounters, Module, Parameter
from .kfac import KFAC
from .layers import (
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
)
from .models import build, cifarnet, lenet, mlp
from .optim import (
    SGD,
    Adam,
    ConstantLR,
    CosineLR,
    Optimizer,
    Schedule,
    StepLR,
    parse_schedule,
    schedule_from_dict,
)
from .parallel import AllReduce, ring_allreduce
from .policy import PRODUCTS, ROLES, LossScale, Policy, Role

__all__ = [
    "AvgPool2d", "BatchNorm2d", "Context", "Conv2d", "Dropout", "Flatten", "LayerCounters",
    "Linear", "LossScale", "MaxPool2d", "Module", "PRODUCTS", "Parameter", "Policy", "ROLES",
    "ReLU", "Role", "Sequential", "SoftmaxCrossEntropy", "build", "cifarnet", "lenet", "mlp",
    "Adam", "ConstantLR", "CosineLR", "Optimizer", "SGD", "Schedule", "StepLR", "parse_schedule",
    "schedule_from_dict", "KFAC", "AllReduce", "ring_allreduce",
]
