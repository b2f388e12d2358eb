"""Download the BabyLM multimodal data from OSF, or write the built-in sample with --test.

    python download_babylm_data.py --data_dir ../babylm_dataset/        # the official release (~tens of GB)
    python download_babylm_data.py --list                               # listing with sizes
    python download_babylm_data.py --test                               # sample world into data/babylm_sample

Every file is checked against the OSF listing (size, md5/sha256) before it counts as complete; only https://
links are followed. The sample world never overwrites files it did not write (see eval/sample_world.json).

All logic lives in bitmar.data.download.
"""

from bitmar.data.download import main

if __name__ == "__main__":
    raise SystemExit(main())
