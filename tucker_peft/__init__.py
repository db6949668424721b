"""tucker-peft: rank-adaptive Tucker adapters (TDLRT) as a Hugging Face PEFT method.

Importing this package registers the method with PEFT (``PeftType.TUCKER``), so that ``get_peft_model``,
``PeftModel.from_pretrained``, ``inject_adapter_in_model`` and diffusers' ``add_adapter`` accept a
:class:`TuckerLoraConfig`.  Loading a saved Tucker adapter does not need the import: the installed
``tucker_peft-autoload.pth`` makes PEFT import this package when it reads an adapter config with
``peft_type: TUCKER`` (``_tucker_peft_autoload.py``).
"""

from . import model_card
from ._registry import TUCKER_PEFT_TYPE, register
from .adapters_io import load_adapter, load_into_pipeline, save_adapter
from .config import TuckerLoraConfig
from .export import export_lora, from_lora
from .integration import TuckerLoraCallback, attach, detach, rank_summary, save_rank_report
from .layer import Conv, Linear, TuckerLayer
from .model import TuckerLoraModel, adapter_parameter_count, current_ranks, iter_tucker_layers
from .optimizer import TuckerOptimizer, non_tucker_parameters, tucker_parameters

register(TuckerLoraConfig, TuckerLoraModel)
model_card.install()

__version__ = "0.1.0"

__all__ = [
    "TUCKER_PEFT_TYPE",
    "Conv",
    "Linear",
    "TuckerLayer",
    "TuckerLoraCallback",
    "TuckerLoraConfig",
    "TuckerLoraModel",
    "TuckerOptimizer",
    "adapter_parameter_count",
    "attach",
    "current_ranks",
    "detach",
    "export_lora",
    "from_lora",
    "iter_tucker_layers",
    "load_adapter",
    "load_into_pipeline",
    "non_tucker_parameters",
    "rank_summary",
    "save_adapter",
    "save_rank_report",
    "tucker_parameters",
]
