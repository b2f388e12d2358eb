"""BabyLM multimodal data: download, sample world, verification, tokenizer and loaders."""
