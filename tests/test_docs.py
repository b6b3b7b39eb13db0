# The README's promises that code can check: its paper map quotes lines that are really in the function it names, its
# links lead to files that exist, and CI runs exactly its install and test commands.
import inspect
import re
from pathlib import Path

import para_mini.model as model

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title):
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_paper_map_quotes_lines_of_the_functions_it_names():
    rows = [r for r in section("The paper in the code").splitlines() if r.startswith("| Eq.")]
    assert [r.split("|")[1].strip() for r in rows] == [f"Eq. ({i})" for i in range(1, 11)]
    for row in rows:
        _, eq, code, where, _ = row.split("|")
        names = re.findall(r"`([^`]+)`", where)
        sources = [inspect.getsource(getattr(getattr(model, n.split(".")[0]), n.split(".")[1])) for n in names]
        for fragment in re.findall(r"`([^`]+)`", code):
            assert any(fragment in src for src in sources), f"{eq.strip()}: {fragment!r} is not in {names}"


def test_the_readme_links_lead_to_files_that_exist():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert "docs/design.md" in links and "LAB.md" in links
    for link in links:
        assert (ROOT / link).is_file(), link


def test_ci_runs_exactly_the_readmes_install_and_test_commands():
    block = section("Set up and test").split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip()]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands == ['pip install -e ".[test]"', "python -m pytest -q"]
    assert ci[-2:] == commands
