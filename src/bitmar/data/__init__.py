"""BabyLM multimodal data: download, sample world, verification, tokenizer and loaders.

Where to look:
- the release's file names: `layout`; data errors the user can fix: `errors`
- getting the data: `download` (fetch, resume, verify; CLI of download_babylm_data.py) over `osf` (listing, https)
- the synthetic sample world: `sample` (writes the files and the manifest) over `vocabulary`, `world` (scenes and
  features), `world_text` (captions, text corpus), `world_eval` (evaluation sets); `pseudowords` (fast mapping)
- checking a directory: `verify` (CLI of test_dataset_compatibility.py)
- reading it: `corpus` (text files), `features` (caption/feature stores), `tokenizer`, `text` (token cache, text
  blocks), `captions` (caption tokens and dataset), `batches` (the mixed batch schedule), `datasets` (`build_data`)
"""
