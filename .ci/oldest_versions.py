"""Print the lowest versions pyproject.toml allows, as pip requirements
(``name==version``), for ``make test-oldest``: the floors stay true only
if the suite is run against them."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"]:
    found = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
    if found is None:
        raise SystemExit(f"not NAME>=VERSION: {requirement!r}")
    print(f"{found[1]}=={found[2]}")
