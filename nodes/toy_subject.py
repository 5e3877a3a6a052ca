from comfy_api.latest import io

from .comfy_io import pil_to_image_batch

CATEGORY = "DreamBooth"


class ToySubjectPhotos(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DBStudioToySubjectPhotos",
            display_name="Toy Subject Photos",
            category=CATEGORY,
            description="The 5 photos of the toy world's subject (an orange star with a teal eye marking that no "
                        "caption names), for trying the pack on its toy base model in a few CPU minutes.",
            inputs=[],
            outputs=[io.Image.Output("photos", display_name="photos",
                                     tooltip="5 photos, 64 px, for DreamBooth Train's instance_images.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        from ..trainer.toy.experiment import PHOTO_SIZE
        from ..trainer.toy.world import subject_views

        return io.NodeOutput(pil_to_image_batch([image for image, _ in subject_views("train", size=PHOTO_SIZE)]))
