"""Files copied into an exported model folder (Hugging Face remote code); see ``hf_export``."""
