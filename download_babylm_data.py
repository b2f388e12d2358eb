"""Download the BabyLM multimodal data from OSF, or write the built-in sample with --test.

    python download_babylm_data.py --data_dir ../babylm_dataset/        # the official release (~tens of GB)
    python download_babylm_data.py --list                               # listing with sizes
    python download_babylm_data.py --data_dir data/sample --test        # sample world, seconds, no network

All logic lives in bitmar.data.download.
"""

from bitmar.data.download import main

if __name__ == "__main__":
    raise SystemExit(main())
