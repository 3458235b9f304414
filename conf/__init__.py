"""Hydra's config package (``pkg://decodebench.conf``). Importing it registers the resolvers its
YAMLs use, so ``decodebench`` and ``compose_run_config`` compose the same configs."""

from omegaconf import OmegaConf

from decodebench.models.naming import model_name_from_id

# conf/model/hf.yaml: the name of your own model is its id's last part
OmegaConf.register_new_resolver("hf_model_name", model_name_from_id, replace=True)
