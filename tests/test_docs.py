"""The README and docs/ say only what exists: every relative link reaches a file (and its heading), every
`hfrecipes <command>` is a command of the CLI's own parser, every bundled recipe named resolves, every path into the
source tree exists, every module has its row in the code map, and the figures copied from the code equal the code's.
No model is built.

pytest tests/test_docs.py -q
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
from pathlib import Path

import pytest

from hfrecipes import cli, costs
from hfrecipes.recipe import resolve_recipe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 10_000  # bytes: the README is the door; each topic has its page in docs/

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # inline code, which may wrap onto a second line
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# A command at the start of a shell line or after a launcher (`-m hfrecipes`), never `import hfrecipes`.
COMMAND_IN_BLOCK = re.compile(r"(?:^|[\s;&|(])(?<!import )hfrecipes[ \t]+([A-Za-z][\w-]*)", re.M)
COMMAND_INLINE = re.compile(r"^(?:.*\s)?hfrecipes\s+([A-Za-z][\w-]*)")
CONFIG = re.compile(r"(?:--config|hfrecipes[ \t]+(?:lifecycle|check))[ \t]+([\w.-]+/[\w./-]+)")
TREE_PATH = re.compile(
    r"(?<![\w./<>-])((?:scripts|bench|recipes|tests|hfrecipes|cards|\.ci)/(?:\{[^{}\s]*\}|[^\s`'\")\]|,;:{])*)"
)


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _code(text: str) -> tuple[list[str], list[str]]:
    """(fenced blocks, inline code spans outside them)."""
    return [m.group(0) for m in FENCE.finditer(text)], INLINE.findall(_prose(text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _expand(path: str) -> list[str]:
    """`sft{,_lora}.yaml` -> its alternatives; `<model>`, `...` and `*` -> glob patterns."""
    path = re.sub(r"/\.\.\.$", "", path.rstrip("."))
    path = re.sub(r"<[^>]+>", "*", path)
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _commands() -> set[str]:
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)


def _ids(pages):
    return [str(p.relative_to(ROOT)) for p in pages]


def test_the_readme_is_the_door():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move the detail into docs/"
    text = README.read_text()
    assert "bash scripts/test.sh" in text, "README.md lost the test command .ci/run runs"
    linked = {(README.parent / t).resolve() for t in LINK.findall(_prose(text))}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    assert not broken, f"{page.name}: broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_command_and_recipe_named_exists(page):
    commands = _commands()
    blocks, inline = _code(page.read_text())
    named = {c for b in blocks for c in COMMAND_IN_BLOCK.findall(b)}
    named |= {m.group(1) for s in inline if (m := COMMAND_INLINE.match(s))}
    unknown = sorted(named - commands)
    assert not unknown, (
        f"{page.name} names hfrecipes commands the CLI does not have: {unknown} (it has {sorted(commands)})"
    )
    missing = []
    for name in {c for code in (*blocks, *inline) for c in CONFIG.findall(code) if "..." not in c}:
        try:
            resolve_recipe(name)
        except Exception as e:  # noqa: BLE001  (the recipe module's own message says why)
            missing.append(f"{name}: {e}")
    assert not missing, f"{page.name} names recipes that do not resolve:\n" + "\n".join(missing)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_source_tree_path_exists(page):
    missing = []
    for path in sorted(set(TREE_PATH.findall(page.read_text()))):
        if not any(list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists() for p in _expand(path)):
            missing.append(path)
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def test_the_code_map_names_every_module():
    """docs/architecture.md has a row for every module under hfrecipes/ (by its path, or its package's folder)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([^`\s]+)`", text))
    package = ROOT / "hfrecipes"
    missing = []
    for module in sorted(package.rglob("*.py")):
        rel = module.relative_to(package)
        folders = {f"{p.as_posix()}/" for p in rel.parents if p != Path(".")}
        if rel.as_posix() not in named and not folders & named:
            missing.append(rel.as_posix())
    assert not missing, f"docs/architecture.md's code map lacks: {missing}"


def test_the_device_table_is_the_codes():
    text = (ROOT / "docs" / "cost.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*\|$", text, re.M)}
    assert set(rows) == set(costs.DEVICES), (
        f"docs/cost.md's device table has {sorted(rows)}, the code {sorted(costs.DEVICES)}"
    )
    for key, d in costs.DEVICES.items():
        memory = "host" if d.memory_bytes is None else f"{d.memory_bytes / 1e9:g} GB"
        want = (
            f"| `{key}` | {d.label} | {d.peak_flops / 1e12:g} | {d.power_watts:g} | ${d.price_per_hour:.2f} | "
            f"{memory} | {d.memory_bandwidth / 1e12:g} TB/s |"
        )
        assert rows[key] == want, f"docs/cost.md, device {key}: has\n{rows[key]}\nthe code gives\n{want}"


def test_the_cost_example_is_what_the_command_prints():
    text = (ROOT / "docs" / "cost.md").read_text()
    m = re.search(r"```bash\n(hfrecipes cost [^\n]+)\n```\n\n```text\n(.*?)\n```", text, re.S)
    assert m, "docs/cost.md lost its `hfrecipes cost` example"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(m.group(1).split()[1:]) == 0
    assert out.getvalue().rstrip() == m.group(2), (
        f"docs/cost.md's example output is stale; it now reads:\n{out.getvalue()}"
    )
