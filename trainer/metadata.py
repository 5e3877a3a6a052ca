"""The header metadata keys of the checkpoints we write and read, in one place (no imports: the nodes read them when
ComfyUI registers the pack). modelspec.* keys follow Stability AI's ModelSpec, which A1111 and ComfyUI show."""

SPEC_VERSION = "modelspec.sai_model_spec"
ARCHITECTURE = "modelspec.architecture"
IMPLEMENTATION = "modelspec.implementation"
PREDICTION_TYPE = "modelspec.prediction_type"
PREDICT_KEY = "modelspec.predict_key"  # ComfyUI's CheckpointSave spelling of the prediction type
DATE = "modelspec.date"
TITLE = "modelspec.title"
TRIGGER_PHRASE = "modelspec.trigger_phrase"

# Ours. The module configs as JSON, so any shape (tiny test models included) loads back as it was.
CONFIGS = {"unet": "dreambooth.unet_config", "vae": "dreambooth.vae_config", "text": "dreambooth.text_config",
           "text_2": "dreambooth.text_2_config"}  # text_2: SDXL's second text encoder
IDENTIFIER = "dreambooth.identifier"
CLASS_NOUN = "dreambooth.class_noun"
BASE_MODEL = "dreambooth.base_model"
BASE_MODEL_SHA256 = "dreambooth.base_model_sha256"
TRAIN_CONFIG = "dreambooth.train_config"
STEPS = "dreambooth.steps"
EVALUATIONS = "dreambooth.evaluations"  # trainer/evaluation.py: [{step, subject_fidelity, pres}] up to the saved step
REQUEST = "dreambooth.request"  # trainer/provenance.py: the settings, base model and photos it was trained from
