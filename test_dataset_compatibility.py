"""Check a BabyLM multimodal data directory before training on it.

    python test_dataset_compatibility.py --data_dir ../babylm_dataset [--feature_dim 768] [--no_local_narratives]
        [--nonfinite_features drop|error]

Exit status: 0 usable, 1 not usable (the failing checks say what and how to fix), 2 usage error.
It applies the training loaders' own rules (same functions), and says when a directory is a generated sample world.
All logic lives in bitmar.data.verify.
"""

from bitmar.data.verify import main

if __name__ == "__main__":
    raise SystemExit(main())
