"""DevBench model class for BitMar exports (BabyLM 2025 evaluation pipeline, `--model_type bitmar`).

Installed into a pipeline checkout as `evaluation_pipeline/devbench/model_classes/bitmar.py` by
`scripts/run_babylm_pipeline.py --tasks devbench` (or `--install_devbench`), which also adds the `bitmar` branch to
`evaluation_pipeline/devbench/eval.py`. It runs in the pipeline's environment: torch, transformers and numpy only,
no `bitmar` package (the export carries its own code).

Scores follow the pipeline's own class for generative models (`model_classes/babylm_models.py`, GIT / Flamingo), so
BitMar's DevBench numbers compare with the baselines':
- image-text similarity = minus the mean next-token loss of "The caption for this image is: {text}." given the
  picture (the export's DINOv2 backbone turns `pixel_values` into the feature BitMar was trained on);
- image features (THINGS) = the mean over text positions of the decoder's last hidden state for the picture and a
  one-space text.
The texts of one trial are scored in one batch (right padding; each row's loss counts its own tokens only), which
gives what one call per image-text pair would (`-model(**encoding, labels=input_ids).loss`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from evaluation_pipeline.devbench.eval_model import EvalModel
from tqdm import tqdm

PROMPT = "The caption for this image is: {text}."
NO_BACKBONE = (
    "this BitMar export has no vision backbone, so DevBench's pictures cannot reach it; re-export the checkpoint with "
    "`python -m bitmar.export ... --vision_backbone facebook/dinov2-base`"
)


class BitMarEvalModel(EvalModel):
    def __init__(self, model: Any, processor: Any, device: str = "cpu", prompt: str = PROMPT) -> None:
        if getattr(model, "vision_backbone", None) is None:
            raise ValueError(NO_BACKBONE)
        self.device = device
        self.model = model.to(device).eval()
        self.processor = processor
        self.prompt = prompt
        self.get_image_features = self.get_all_image_feats
        self.get_text_features = self.get_all_text_feats
        self.get_similarity_scores = self.get_all_sim_scores

    @torch.no_grad()
    def pair_scores(self, image: Any, texts: list[str]) -> np.ndarray:
        """(len(texts),) minus the mean next-token loss of each prompt given `image`."""
        prompts = [self.prompt.format(text=text) for text in texts]
        enc = self.processor(
            text=prompts, images=[image.convert("RGB")] * len(prompts), return_tensors="pt", padding=True
        )
        enc = {key: value.to(self.device) for key, value in enc.items() if key != "token_type_ids"}
        logits = self.model(**enc).logits.float()  # (B, T, V)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        counted = (mask[:, 1:] * mask[:, :-1]).to(logp.dtype)  # a target counts when it and its context are real
        return ((logp * counted).sum(dim=1) / counted.sum(dim=1)).cpu().numpy()

    def get_all_sim_scores(self, dataloader: Any) -> np.ndarray:
        """(trials, images per trial, texts per trial) image-text scores."""
        all_sims = []
        for d in tqdm(dataloader, desc="Processing data"):
            sims = np.stack([self.pair_scores(image, list(d["text"])) for image in d["images"]])
            all_sims.append(sims)
        return np.stack(all_sims, axis=0)

    @torch.no_grad()
    def get_all_image_feats(self, dataloader: Any) -> np.ndarray:
        """(images, hidden_size) mean last hidden state of the text positions given each picture."""
        all_feats = []
        for d in tqdm(dataloader, desc="Processing data"):
            images = [image.convert("RGB") for image in d["images"]]
            enc = self.processor(text=[" "] * len(images), images=images, return_tensors="pt", padding=True)
            enc = {key: value.to(self.device) for key, value in enc.items() if key != "token_type_ids"}
            hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1]  # (B, T, C)
            mask = enc["attention_mask"][..., None].to(hidden.dtype)  # (B, T, 1)
            all_feats.append(((hidden * mask).sum(dim=1) / mask.sum(dim=1)).float().cpu().numpy())
        return np.concatenate(all_feats, axis=0)

    @torch.no_grad()
    def get_all_text_feats(self, dataloader: Any) -> np.ndarray:
        """(texts, hidden_size) mean last hidden state of each text's positions (no picture)."""
        all_feats = []
        for d in tqdm(dataloader, desc="Processing data"):
            enc = self.processor(text=list(d["text"]), return_tensors="pt", padding=True)
            enc = {key: value.to(self.device) for key, value in enc.items() if key != "token_type_ids"}
            hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1]  # (B, T, C)
            mask = enc["attention_mask"][..., None].to(hidden.dtype)
            all_feats.append(((hidden * mask).sum(dim=1) / mask.sum(dim=1)).float().cpu().numpy())
        return np.concatenate(all_feats, axis=0)
