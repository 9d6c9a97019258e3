"""Model card templates for flowhn-export, one per preset (Jinja, rendered by huggingface_hub.ModelCard)."""
