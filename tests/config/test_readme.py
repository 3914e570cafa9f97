"""The README's config reference is generated from the config tree's field docstrings: it must match the code."""
from pathlib import Path

from linear_moe.config import config_reference

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def test_readme_config_reference_is_current():
    text = README.read_text()
    block = text[text.index(START) + len(START):text.index(END)].strip()
    assert block == config_reference().strip(), (
        "README config reference is stale; regenerate it with "
        "`python -c \"from linear_moe.config import config_reference; print(config_reference())\"`")
