"""Top attention heads, figures and a markdown report of a BitMar run (see bitmar/analysis/report.py).

    python analyze_attention_heads.py [--analysis_dir RUN_OR_ANALYSIS_DIR] --attention_type all \
        [--top_k 5] [--create_report] [--output_dir OUT]
"""

import sys

from bitmar.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
