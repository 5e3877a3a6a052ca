"""The pack's node list, as ComfyUI's V3 API asks for it."""
from comfy_api.latest import ComfyExtension, io

from .class_priors import GenerateClassPriors
from .empty_latent import EmptyLatentForVAE
from .load_subject import LoadSubjectModel
from .measure_fidelity import MeasureSubjectFidelity
from .pick_token import PickRareToken
from .toy_subject import ToySubjectPhotos
from .train import DreamBoothTrain


class DreamBoothExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from ..trainer import quiet
        from .comfy_hooks import add_routes

        # Here, called once at load: ComfyUI 0.3.64 never calls on_load.
        quiet.install()  # three library notices nobody using the pack can act on; nothing else is filtered
        add_routes()
        return [PickRareToken, GenerateClassPriors, DreamBoothTrain, LoadSubjectModel, EmptyLatentForVAE,
                ToySubjectPhotos, MeasureSubjectFidelity]
