"""Test helpers: build transformers' own model for a nanoseek config and save it as a folder."""

import torch
import transformers


def transformers_model(cfg, bias_std: float = 0.1):
    """A random-init transformers model of cfg's architecture (eager attention, float32)."""
    hcfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hcfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for mod in model.modules():   # a zero bias would not test that it only steers selection
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0, bias_std)
    return model


def transformers_folder(cfg, folder):
    model = transformers_model(cfg)
    model.save_pretrained(folder)
    return model
