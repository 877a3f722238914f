"""Print one of the README's two setup commands, exactly as the README writes it.

The README's section "Set up and run (fresh machine)" holds two ```bash blocks: the main job first,
then the test command. CI runs exactly these (`.ci/run`), so the README cannot drift from what CI
proves; tests/test_readme_ci.py checks this parser and .ci/run against each other.

    python .ci/readme_commands.py main|tests [README.md]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

SECTION = "## Set up and run (fresh machine)"
KINDS = ("main", "tests")


def commands(readme: str) -> dict[str, str]:
    """{'main': ..., 'tests': ...} from the README's setup section; ValueError when it is malformed."""
    start = readme.find(SECTION)
    if start < 0:
        raise ValueError(f"README has no section {SECTION!r}")
    body = readme[start + len(SECTION):]
    nxt = re.search(r"^## ", body, flags=re.M)
    body = body[: nxt.start()] if nxt else body
    blocks = re.findall(r"^```bash\n(.*?)^```", body, flags=re.M | re.S)
    if len(blocks) != 2:
        raise ValueError(f"the section {SECTION!r} must hold exactly two ```bash blocks, found {len(blocks)}")
    cmds = []
    for b in blocks:
        lines = [ln for ln in b.strip().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if len(lines) != 1:
            raise ValueError(f"each setup block must be one command line, found {len(lines)}: {b!r}")
        cmds.append(lines[0].strip())
    return dict(zip(KINDS, cmds))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in KINDS:
        sys.exit("usage: python .ci/readme_commands.py main|tests [README.md]")
    path = Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).resolve().parents[1] / "README.md"
    print(commands(path.read_text())[sys.argv[1]])
