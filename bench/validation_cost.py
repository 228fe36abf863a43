"""Validation cost: `digitflow validate` on all 70,000 images.

python bench/validation_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import re

from common import median, project_copy, timed, write_result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = project_copy("validation")
    walls, inside = [], []
    for _ in range(args.repeats):
        wall, output = timed(["digitflow", "validate"], work)
        walls.append(round(wall, 2))
        inside.append(float(re.search(r"expectations met \(([\d.]+) s\)", output).group(1)))
        print(f"validate: {wall:.2f} s wall, {inside[-1]} s inside the command", flush=True)
    figures = {
        "images": 70000,
        "command_wall_seconds": walls,
        "validation_seconds": inside,
        "median_command_wall_seconds": median(walls),
        "median_validation_seconds": median(inside),
    }
    write_result("validation", figures)
    print(json.dumps({k: v for k, v in figures.items() if k.startswith("median")}, indent=2))


if __name__ == "__main__":
    main()
