#!/usr/bin/env python3
"""Start-up time to the first iteration at COCO scale: stock detectron2 against gn-det's train_net.

    python3 tools/startup_benchmark.py --root /tmp/startup --generate-only     # the set alone (~45 s, 210 MB)
    python3 tools/startup_benchmark.py --root /tmp/startup --processes 1 2 --repeats 2 --output startup.json

ROOT gets the generated COCO-scale set (118,287 images as hard links, 860,001 annotations); keep it outside
the repository. What is measured and how: gn_det/analysis/startup.py (docs/STARTUP.md has the results).
"""
import sys

from gn_det.analysis.startup import main

if __name__ == "__main__":
    main(sys.argv[1:])
